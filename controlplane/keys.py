"""The etcd key layout, in one place (documented in docs/etcd-layout.md).

    <prefix>/tenants/<tenant>/nodes/<node_id>          NodeRecord      agent lease (tenant's role writes)
    <prefix>/tenants/<tenant>/instances/<model>/<id>   InstanceRecord  agent lease (tenant's role writes)
    <prefix>/nodes/<node_id>                           NodeRecord      old layout: tenant "legacy"
    <prefix>/instances/<model>/<instance_id>           InstanceRecord  old layout: tenant "legacy"
    <prefix>/desired/<node_ref>/<assignment_id>        Assignment      written by apply
    <prefix>/models/<model>                            ModelSpec       catalog
    <prefix>/keys/<sha256 hex of the API key>          ApiKey
    <prefix>/plans/current                             PlanRecord
    <prefix>/demand/<model>/<gateway_id>               Demand          LEGACY, read only (now in GatewayRecord)
    <prefix>/gateways/<gateway_id>                     GatewayRecord   gateway lease (demand, limit load)
    <prefix>/usage/<key_id>/<model>/<gateway_id>       Usage           LEGACY, read and folded
    <prefix>/accounting/writers/<writer>/<day>/<part>  UsageBlock      one gateway process's day
    <prefix>/accounting/merged/<period>/<part>         UsageBlock      folded: days, then months
    <prefix>/accounting/leader                         (election)      usage compactor, gateway lease
    <prefix>/control/nodes/<node_ref>                  NodeControl     `ctl nodes drain`
    <prefix>/planner/leader                            (election)      planner lease
    <prefix>/harvest/jobs/<job_id>                     HarvestJob      harvest leader
    <prefix>/harvest/status                            HarvestStatus   harvest leader's lease
    <prefix>/harvest/leader                            (election)      harvest leader's lease
    <prefix>/tokens/…                                  reserved for the tunnel's join tokens

A node ref is ``<tenant>/<node_id>`` (legacy nodes: the node id), one percent-encoded segment
(controlplane/tenancy.py).

Model names may contain '/' (HF ids like "meta-llama/Llama-3.1-8B"); they are percent-encoded
as one key segment so prefixes stay unambiguous.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import quote, unquote

from google.protobuf.message import DecodeError, Message

from controlplane.store.client import KeyValue
from controlplane.tenancy import LEGACY, node_ref, split_node_ref

M = TypeVar("M", bound=Message)


def encode_segment(name: str) -> str:
    """Percent-encode a name (model, node, …) so it is exactly one key segment."""
    if not name:
        raise ValueError("empty name in an etcd key")
    return quote(name, safe="-_.:@+=,")


def decode_segment(segment: str) -> str:
    """Inverse of encode_segment."""
    return unquote(segment)


@dataclass(frozen=True)
class Keys:
    """Builds every key modelpool uses under one prefix."""

    prefix: str = "/modelpool"

    def _k(self, *parts: str) -> str:
        return "/".join((self.prefix, *parts))

    # prefixes (always ending in '/')
    @property
    def nodes(self) -> str:
        return self._k("nodes", "")

    @property
    def instances(self) -> str:
        return self._k("instances", "")

    @property
    def desired(self) -> str:
        return self._k("desired", "")

    @property
    def models(self) -> str:
        return self._k("models", "")

    @property
    def api_keys(self) -> str:
        return self._k("keys", "")

    @property
    def demand(self) -> str:
        return self._k("demand", "")

    @property
    def gateways(self) -> str:
        return self._k("gateways", "")

    @property
    def usage(self) -> str:
        return self._k("usage", "")

    @property
    def accounting(self) -> str:
        """Everything the usage accounting writes (docs/etcd-layout.md)."""
        return self._k("accounting", "")

    @property
    def usage_writers(self) -> str:
        return self._k("accounting", "writers", "")

    @property
    def usage_merged(self) -> str:
        return self._k("accounting", "merged", "")

    @property
    def usage_leader(self) -> str:
        return self._k("accounting", "leader")

    @property
    def node_controls(self) -> str:
        return self._k("control", "nodes", "")

    @property
    def tenants(self) -> str:
        return self._k("tenants", "")

    def tenant(self, tenant: str) -> str:
        """Everything tenant ``tenant`` may write: ``<prefix>/tenants/<tenant>/``."""
        return self._k("tenants", encode_segment(tenant), "")

    @property
    def tokens(self) -> str:
        return self._k("tokens", "")

    @property
    def harvest(self) -> str:
        return self._k("harvest", "")

    @property
    def plans(self) -> str:
        return self._k("plans", "")

    @property
    def planner(self) -> str:
        return self._k("planner", "")

    @property
    def root(self) -> str:
        """The key ``<prefix>/`` itself (probes count it; every role may read it)."""
        return self.prefix + "/"

    def for_tenant(self, tenant: str) -> TenantKeys:
        """The keys an agent of ``tenant`` writes and reads (legacy: the old layout)."""
        return TenantKeys(self, tenant)

    # single keys
    def node(self, node_id: str) -> str:
        return self._k("nodes", encode_segment(node_id))

    def instance(self, model: str, instance_id: str) -> str:
        return self._k("instances", encode_segment(model), encode_segment(instance_id))

    def desired_for_node(self, node_id: str) -> str:
        return self._k("desired", encode_segment(node_id), "")

    def assignment(self, node_id: str, assignment_id: str) -> str:
        return self._k("desired", encode_segment(node_id), encode_segment(assignment_id))

    def model(self, name: str) -> str:
        return self._k("models", encode_segment(name))

    def api_key(self, key_hash: str) -> str:
        return self._k("keys", key_hash)

    @property
    def current_plan(self) -> str:
        return self._k("plans", "current")

    def demand_entry(self, model: str, gateway_id: str) -> str:
        return self._k("demand", encode_segment(model), encode_segment(gateway_id))

    def gateway(self, gateway_id: str) -> str:
        return self._k("gateways", encode_segment(gateway_id))

    def usage_entry(self, key_id: str, model: str, gateway_id: str) -> str:
        return self._k("usage", encode_segment(key_id), encode_segment(model), encode_segment(gateway_id))

    def usage_writer_part(self, writer: str, period: str, part: int) -> str:
        return self._k("accounting", "writers", encode_segment(writer), encode_segment(period), str(part))

    def usage_merged_part(self, period: str, part: int) -> str:
        return self._k("accounting", "merged", encode_segment(period), str(part))

    def parse_usage_block_key(self, key: str) -> UsageBlockKey | None:
        """The parts of an ``accounting/writers/…`` or ``accounting/merged/…`` key (None: neither)."""
        if key.startswith(self.usage_writers):
            parts = key[len(self.usage_writers):].split("/")
            if len(parts) == 3 and parts[2].isdigit():
                return UsageBlockKey(decode_segment(parts[0]), decode_segment(parts[1]), int(parts[2]))
        elif key.startswith(self.usage_merged):
            parts = key[len(self.usage_merged):].split("/")
            if len(parts) == 2 and parts[1].isdigit():
                return UsageBlockKey("", decode_segment(parts[0]), int(parts[1]))
        return None

    def node_control(self, node_ref: str) -> str:
        return self._k("control", "nodes", encode_segment(node_ref))

    def node_key_of_ref(self, node_ref: str) -> str:
        """The node record key of a node ref (``tenant/node_id``, or a legacy node id)."""
        tenant, node_id = split_node_ref(node_ref)
        return self.node(node_id) if tenant == LEGACY else self.tenant(tenant) + "nodes/" + encode_segment(node_id)

    @property
    def planner_leader(self) -> str:
        return self._k("planner", "leader")

    @property
    def harvest_jobs(self) -> str:
        return self._k("harvest", "jobs", "")

    def harvest_job(self, job_id: str) -> str:
        return self._k("harvest", "jobs", encode_segment(job_id))

    @property
    def harvest_status(self) -> str:
        return self._k("harvest", "status")

    @property
    def harvest_leader(self) -> str:
        return self._k("harvest", "leader")


@dataclass(frozen=True)
class TenantKeys:
    """One tenant's record keys (``legacy``: the old layout) and the refs of its nodes."""

    keys: Keys
    tenant: str

    @property
    def legacy(self) -> bool:
        """True for the old layout's reserved tenant."""
        return self.tenant == LEGACY

    def node(self, node_id: str) -> str:
        """Where this tenant's agent registers node ``node_id``."""
        if self.legacy:
            return self.keys.node(node_id)
        return self.keys.tenant(self.tenant) + "nodes/" + encode_segment(node_id)

    def instance(self, model: str, instance_id: str) -> str:
        """Where this tenant's agent registers an instance."""
        if self.legacy:
            return self.keys.instance(model, instance_id)
        return self.keys.tenant(self.tenant) + "instances/" + encode_segment(model) + "/" + encode_segment(instance_id)

    def node_ref(self, node_id: str) -> str:
        """How desired/ and control/ name node ``node_id`` of this tenant."""
        return node_ref(self.tenant, node_id)


@dataclass(frozen=True, slots=True)
class UsageBlockKey:
    """Where a UsageBlock lives: its writer ("" for merged records), period and part number."""

    writer: str
    period: str
    part: int


class RecordDecodeError(ValueError):
    """A value in etcd is not the protobuf message its key promises."""


def decode(message_type: type[M], kv: KeyValue) -> M:
    """Parse ``kv.value`` as ``message_type``; raises RecordDecodeError naming the key."""
    msg = message_type()
    try:
        msg.ParseFromString(kv.value)
    except DecodeError as exc:
        raise RecordDecodeError(f"{kv.key}: not a valid {message_type.__name__}: {exc}") from exc
    return msg


def decode_all(message_type: type[M], kvs: Iterable[KeyValue], warnings: list[str]) -> list[tuple[KeyValue, M]]:
    """Every record of ``kvs`` that decodes, with its key-value; one warning per record that does not."""
    out: list[tuple[KeyValue, M]] = []
    for kv in kvs:
        try:
            out.append((kv, decode(message_type, kv)))
        except RecordDecodeError as exc:
            warnings.append(str(exc))
    return out
