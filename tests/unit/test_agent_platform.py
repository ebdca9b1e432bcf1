"""Pure parts of the agent's platform handling: Kubernetes detection, engine port ranges, and
the engine model-card fields kept for /v1/models."""

from __future__ import annotations

import random
import socket

import pytest

from agent.instance import model_card_fields
from agent.kubernetes import KubernetesPod, detect_kubernetes
from agent.ports import PortPicker, PortRange, PortRangeError, PortRangeExhausted, candidate_order
from agent.runtime import default_node_id
from gateway.table import Endpoint, engine_card_fields

IN_POD = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "POD_NAME": "model-a-5d8f-x", "POD_NAMESPACE": "pool",
          "NODE_NAME": "gpu-3", "POD_IP": "10.1.2.3"}


def test_detect_kubernetes() -> None:
    pod = detect_kubernetes(IN_POD)
    assert pod == KubernetesPod("model-a-5d8f-x", "pool", "gpu-3", "10.1.2.3")
    assert pod.node_id == "model-a-5d8f-x" and default_node_id(None, pod) == "model-a-5d8f-x"
    assert pod.labels() == {"platform": "kubernetes", "k8s_namespace": "pool", "k8s_node": "gpu-3"}
    assert detect_kubernetes({}) is None
    assert detect_kubernetes({"POD_NAME": "x"}) is None                          # not in Kubernetes
    assert detect_kubernetes({"KUBERNETES_SERVICE_HOST": "h"}) is None           # no downward API: no name
    assert detect_kubernetes({**IN_POD, "POD_NAME": "a/b"}) is None              # would break etcd keys
    assert detect_kubernetes({**IN_POD, "POD_NAMESPACE": "Bad_NS"}) == KubernetesPod("model-a-5d8f-x", "", "gpu-3",
                                                                                    "10.1.2.3")


@pytest.mark.parametrize(("text", "expected"), [("8100-8199", PortRange(8100, 8199)), ("8100", PortRange(8100, 8100)),
                                                (" 1-65535 ", PortRange(1, 65535))])
def test_port_range_parse(text: str, expected: PortRange) -> None:
    assert PortRange.parse(text) == expected


@pytest.mark.parametrize("text", ["", "a-b", "9000-8000", "0-10", "1-70000", "8100-", "-8100", "81 00"])
def test_port_range_parse_rejects(text: str) -> None:
    with pytest.raises(PortRangeError):
        PortRange.parse(text)


def test_candidate_order_wraps_and_skips() -> None:
    assert candidate_order(PortRange(10, 14), 13, skip=[10]) == [13, 14, 11, 12]
    assert candidate_order(PortRange(10, 10), 10, skip=[10]) == []


def test_picker_takes_a_bindable_port_of_the_range_that_no_instance_holds() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        held.listen()
        ports = PortRange(taken, taken + 2) if taken + 2 <= 65535 else PortRange(taken - 2, taken)
        others = [p for p in range(ports.low, ports.high + 1) if p != taken]
        picker = PortPicker(ports, in_use=lambda: [others[0]], rng=random.Random(0))
        assert picker("127.0.0.1") == others[1]   # taken is bound, others[0] belongs to another instance
        full = PortPicker(ports, in_use=lambda: others)
        with pytest.raises(PortRangeExhausted, match="no free port"):
            full("127.0.0.1")
    assert 0 < PortPicker(None)("127.0.0.1") < 65536


def test_model_card_fields() -> None:
    assert model_card_fields({"id": "m", "max_model_len": 1024, "root": "/w", "parent": None}) == (1024, "/w", "")
    assert model_card_fields(None) == (0, "", "")
    assert model_card_fields({"max_model_len": True, "root": 5}) == (0, "", "")
    assert model_card_fields({"max_model_len": 2**40, "root": "x" * 900})[0:1] == (0,)
    assert len(model_card_fields({"root": "x" * 900})[1]) == 500


def _ep(iid: str, length: int = 0, root: str = "", parent: str = "") -> Endpoint:
    return Endpoint(iid, "m", "http://h:1", 2, 1.0, 0, "n", "", "", length, root, parent)


def test_engine_card_fields_take_the_smallest_context_and_the_first_root() -> None:
    assert engine_card_fields(()) == {}
    assert engine_card_fields((_ep("a"),)) == {}            # engines that do not report: no vLLM keys
    assert engine_card_fields((_ep("a", 4096, "/w"), _ep("b", 2048, "/w2", "base"))) == {
        "max_model_len": 2048, "root": "/w", "parent": "base"}
