"""ops/k8s: what `kubectl kustomize` renders from the base and each overlay is valid Kubernetes
(kubernetes-validate --strict against a pinned version), has the parts the pool needs, and every
modelpool container runs a command line that the real `ctl` parser accepts."""

from __future__ import annotations

import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from controlplane.catalog import load_catalog
from controlplane.planner.live import ClusterConfig
from tests.ops.ctlparse import CtlUsageError, parse_ctl

K8S = Path(__file__).resolve().parents[2] / "ops" / "k8s"
KUBERNETES_VERSION = "1.32.0"      # the oldest release still supported upstream when written; bump with care
KUSTOMIZATIONS = [K8S / "base", *sorted(p for p in (K8S / "overlays").iterdir() if p.is_dir())]
ENGINE_STOP_GRACE_S = 15           # agent/instance.py InstanceTimings.stop_grace_s
DRAIN_CONFIRM_S = 5                # DRAINING confirmed in etcd (at most)
EXIT_WATCHDOG_S = 10               # run_async(exit_within_s=10)

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None,
                                reason="kubectl not installed (apt-get install kubectl renders kustomize offline)")


@cache
def render(directory: Path) -> list[dict[str, Any]]:
    out = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def objects(directory: Path, kind: str) -> list[dict[str, Any]]:
    return [o for o in render(directory) if o["kind"] == kind]


def one(directory: Path, kind: str, name: str) -> dict[str, Any]:
    [found] = [o for o in objects(directory, kind) if o["metadata"]["name"] == name]
    return found


def pod_specs(directory: Path) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"])
            for o in render(directory) if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def flag(command: list[str], name: str) -> str:
    for i, arg in enumerate(command):
        if arg == name:
            return command[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise KeyError(name)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_every_rendered_object_validates_strictly(directory: Path) -> None:
    rendered = render(directory)
    assert rendered
    for obj in rendered:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{directory.name}: {obj['kind']}/{obj['metadata']['name']}: {exc.message} at "
                        f"{'.'.join(str(p) for p in exc.path)}")


def test_validation_rejects_what_it_should() -> None:
    # the check above can fail: a misspelt field and a wrong type are rejected under --strict
    deployment = dict(one(K8S / "base", "Deployment", "modelpool-gateway"))
    bad = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_every_modelpool_container_runs_a_real_ctl_command(directory: Path) -> None:
    seen = 0
    for where, spec in pod_specs(directory):
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            if "modelpool" not in container["image"]:
                continue
            command = [*container.get("command", []), *container.get("args", [])]
            assert command[:1] == ["ctl"], f"{where}/{container['name']}: {command}"
            try:
                parse_ctl(command[1:])
            except CtlUsageError as exc:
                pytest.fail(f"{where}/{container['name']}: {exc}")
            seen += 1
    assert seen >= 5  # gateway, planner + its catalog init, exporter, the model's agent


def test_ctl_parse_check_can_fail() -> None:
    with pytest.raises(CtlUsageError, match="No such option"):
        parse_ctl(["gateway", "--workerz", "2"])
    with pytest.raises(CtlUsageError):
        parse_ctl(["planner", "run", "--interval", "soon"])


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_the_pool_parts_are_there(directory: Path) -> None:
    etcd = one(directory, "StatefulSet", "etcd")
    assert etcd["spec"]["replicas"] == 3 and etcd["spec"]["volumeClaimTemplates"]
    [container] = etcd["spec"]["template"]["spec"]["containers"]
    assert {"--auto-compaction-mode=periodic", "--auto-compaction-retention=1h"} <= set(container["command"])
    assert any(a.startswith("--quota-backend-bytes=") for a in container["command"])
    anti = etcd["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert anti["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"] == "kubernetes.io/hostname"

    gateway = one(directory, "Deployment", "modelpool-gateway")
    assert gateway["spec"]["replicas"] >= 2
    hpa = one(directory, "HorizontalPodAutoscaler", "modelpool-gateway")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "modelpool-gateway" and hpa["spec"]["minReplicas"] >= 2
    assert one(directory, "PodDisruptionBudget", "modelpool-gateway")["spec"]["minAvailable"] >= 1
    assert one(directory, "Service", "modelpool-gateway")
    assert one(directory, "Service", "etcd")["spec"]["clusterIP"] == "None"

    planner = one(directory, "Deployment", "modelpool-planner")
    assert planner["spec"]["replicas"] == 2
    assert planner["spec"]["template"]["spec"]["containers"][0]["command"][:3] == ["ctl", "planner", "run"]
    assert {p["metadata"]["name"] for p in objects(directory, "NetworkPolicy")} >= {"etcd", "modelpool-model"}


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_the_model_workload_drains_within_its_grace_period(directory: Path) -> None:
    [model] = [o for o in objects(directory, "Deployment") if o["metadata"]["name"].startswith("model-")]
    spec = model["spec"]["template"]["spec"]
    [agent] = spec["containers"]
    command = agent["command"]
    assert parse_ctl(command[1:])[0] == "agent" and flag(command, "--engine") == "vllm"
    assert agent["resources"]["limits"]["nvidia.com/gpu"] == "1"
    needed = float(flag(command, "--drain-grace")) + DRAIN_CONFIRM_S + ENGINE_STOP_GRACE_S + EXIT_WATCHDOG_S
    assert spec["terminationGracePeriodSeconds"] >= needed
    # the probes reach the engine on the one port its range allows
    port = int(flag(command, "--engine-port-range").split("-")[0])
    assert agent["readinessProbe"]["httpGet"]["port"] == "engine"
    assert {p["name"]: p["containerPort"] for p in agent["ports"]}["engine"] == port
    # the downward API gives the agent its pod facts (agent/kubernetes.py)
    downward = {e["name"] for e in agent["env"] if "fieldRef" in e.get("valueFrom", {})}
    assert {"POD_NAME", "POD_NAMESPACE", "NODE_NAME", "POD_IP"} <= downward
    assert "livenessProbe" not in agent  # a kubelet restart would cut in-flight requests


def test_catalog_and_cluster_configmaps_are_valid(tmp_path: Path) -> None:
    [catalog] = [o for o in objects(K8S / "base", "ConfigMap") if o["metadata"]["name"].startswith("modelpool-catalog")]
    (tmp_path / "models.yaml").write_text(catalog["data"]["models.yaml"])
    (tmp_path / "cluster.yaml").write_text(catalog["data"]["cluster.yaml"])
    models = load_catalog(tmp_path / "models.yaml")
    [model] = [o for o in objects(K8S / "base", "Deployment") if o["metadata"]["name"].startswith("model-")]
    served = flag(model["spec"]["template"]["spec"]["containers"][0]["command"], "--serve")
    assert served in {m.name for m in models}
    ClusterConfig.load(tmp_path / "cluster.yaml")
    scrape = [o for o in objects(K8S / "base", "ConfigMap") if o["metadata"]["name"].startswith("modelpool-prometheus")]
    jobs = yaml.safe_load(scrape[0]["data"]["scrape-configs.yaml"])
    assert {j["job_name"] for j in jobs} == {"modelpool-pods", "modelpool-engines"}


def test_etcd_tls_overlay_switches_servers_and_every_client() -> None:
    tls = K8S / "overlays" / "example-tls"
    [etcd] = one(tls, "StatefulSet", "etcd")["spec"]["template"]["spec"]["containers"]
    env = env_of(etcd)
    assert env["ETCD_LISTEN_CLIENT_URLS"].startswith("https://") and env["ETCD_CLIENT_CERT_AUTH"] == "true"
    assert "http://" not in env["ETCD_INITIAL_CLUSTER"] and env["ETCD_PEER_CLIENT_CERT_AUTH"] == "true"
    [config] = [o for o in objects(tls, "ConfigMap") if o["metadata"]["name"].startswith("modelpool-etcd")]
    assert config["data"]["MODELPOOL_ETCD"].startswith("https://")
    mount = config["data"]["MODELPOOL_ETCD_CACERT"].rsplit("/", 1)[0]
    for where, spec in pod_specs(tls):
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            if "modelpool" in container["image"]:
                assert mount in {m["mountPath"] for m in container.get("volumeMounts", [])}, where
    # the plain overlay stays plain
    [plain] = one(K8S / "overlays" / "example", "StatefulSet", "etcd")["spec"]["template"]["spec"]["containers"]
    assert env_of(plain)["ETCD_LISTEN_CLIENT_URLS"].startswith("http://")
