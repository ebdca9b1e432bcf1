"""The pool exporter's pure parts: gauges from a pool view, http_sd targets from instances."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from controlplane.exporter import PoolView, _Collector, pool_families, sd_targets
from controlplane.pb import Gpu, InstanceRecord, InstanceState, NodeRecord


def _inst(iid: str, model: str, state: int, endpoint: str = "http://10.0.0.5:8100") -> InstanceRecord:
    return InstanceRecord(instance_id=iid, model=model, state=state, endpoint=endpoint, engine="vllm",  # type: ignore[arg-type]
                          node_id="n1", gpu_type="A100-80GB")


def render(view: PoolView) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(pool_families(view)))  # type: ignore[arg-type]
    return generate_latest(registry).decode()


def test_pool_gauges() -> None:
    node = NodeRecord(node_id="n1", gpus=[Gpu(index=0, type="A100-80GB"), Gpu(index=1, type="A100-80GB")],
                      free_gpu_indices=[1], draining=True)
    view = PoolView(nodes=(node,), instances=(_inst("a", "m1", InstanceState.READY),
                                              _inst("b", "m1", InstanceState.STARTING)),
                    catalog=("m1", "m2"), undecodable=1)
    text = render(view)
    assert 'modelpool_pool_instances{engine="vllm",gpu_type="A100-80GB",model="m1",state="ready"} 1.0' in text
    assert 'modelpool_pool_instances{engine="vllm",gpu_type="A100-80GB",model="m1",state="starting"} 1.0' in text
    assert 'modelpool_pool_model_ready_instances{model="m1"} 1.0' in text
    assert 'modelpool_pool_model_ready_instances{model="m2"} 0.0' in text     # in the catalog, not served
    assert 'modelpool_pool_gpus{gpu_type="A100-80GB",state="used"} 1.0' in text
    assert 'modelpool_pool_gpus{gpu_type="A100-80GB",state="free"} 1.0' in text
    assert 'modelpool_pool_nodes{draining="true",pool="false"} 1.0' in text
    assert "modelpool_pool_undecodable_records 1.0" in text


def test_sd_targets_list_live_engines_with_fixed_labels() -> None:
    targets = sd_targets([
        _inst("b", "m1", InstanceState.READY, "https://[fd00::5]:8443"),
        _inst("a", "m1", InstanceState.DRAINING),
        _inst("c", "m1", InstanceState.FAILED),                  # restarting on a new port: not a target
        _inst("d", "m1", InstanceState.READY, "not a url"),
        _inst("e", "m1", InstanceState.READY, "http://host-without-port"),
    ])
    assert [t["targets"] for t in targets] == [["10.0.0.5:8100"], ["[fd00::5]:8443"]]
    assert targets[0]["labels"] == {"__scheme__": "http", "__metrics_path__": "/metrics", "model": "m1",
                                    "instance_id": "a", "node_id": "n1", "engine": "vllm", "gpu_type": "A100-80GB"}
    assert targets[1]["labels"]["__scheme__"] == "https"  # type: ignore[index]
