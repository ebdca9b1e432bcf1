"""Is this agent a Kubernetes pod? Facts from the environment only (no API server calls).

Kubernetes puts ``KUBERNETES_SERVICE_HOST`` into every container; the pod's own name, namespace,
node and IP come from the downward API (ops/k8s/base/model.yaml sets them):

    env:
      - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
      - {name: POD_NAMESPACE, valueFrom: {fieldRef: {fieldPath: metadata.namespace}}}
      - {name: NODE_NAME, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}
      - {name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}

In a pod the agent's node id is the pod name (unique in its namespace while it runs, and what
``kubectl`` shows), Slurm facts are not read (a pod has no job, and no job end to drain before),
and the pod IP is the address gateways reach engines on. The drain on SIGTERM is the same as
everywhere; the pod's terminationGracePeriodSeconds must cover ``--drain-grace`` plus the engine
stop (see docs/operations.md).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

# A node id is a path segment in etcd keys: keep it to what a pod name may contain anyway.
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


@dataclass(frozen=True)
class KubernetesPod:
    """This pod, as the downward API describes it."""

    name: str
    namespace: str = ""
    node_name: str = ""
    pod_ip: str = ""

    @property
    def node_id(self) -> str:
        """The agent's node id: the pod name (unique in the namespace, which holds one pool)."""
        return self.name

    def labels(self) -> dict[str, str]:
        """Node labels that tell operators where the agent runs."""
        out = {"platform": "kubernetes"}
        if self.namespace:
            out["k8s_namespace"] = self.namespace
        if self.node_name:
            out["k8s_node"] = self.node_name
        return out


def detect_kubernetes(env: Mapping[str, str] = os.environ) -> KubernetesPod | None:
    """The pod when running in Kubernetes with POD_NAME set; None otherwise.

    ``KUBERNETES_SERVICE_HOST`` alone (a pod without the downward API variables) is not enough
    to name the node, so it gives None too and the agent falls back to ``<host>-<pid>``: the
    hostname of a pod is its name anyway.
    """
    if not env.get("KUBERNETES_SERVICE_HOST"):
        return None
    name = env.get("POD_NAME", "").strip()
    if not name or not _NAME.match(name):
        return None
    namespace = env.get("POD_NAMESPACE", "").strip()
    if namespace and not _NAME.match(namespace):
        namespace = ""
    return KubernetesPod(name=name, namespace=namespace, node_name=env.get("NODE_NAME", "").strip(),
                         pod_ip=env.get("POD_IP", "").strip())
