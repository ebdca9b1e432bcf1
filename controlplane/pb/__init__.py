"""Generated protobuf code for every record modelpool stores in etcd (sources in proto/).

Import messages from here, never from ``records_pb2`` directly, so the generated module can move.
"""

from controlplane.pb.records_pb2 import (
    ApiKey,
    Assignment,
    Demand,
    GatewayRecord,
    Gpu,
    HarvestJob,
    HarvestJobState,
    HarvestStatus,
    InstanceRecord,
    InstanceState,
    KeyLoad,
    ModelAccess,
    ModelSpec,
    NodeControl,
    NodeRecord,
    PlanAction,
    PlanRecord,
    SlurmJob,
    Usage,
    UsageBlock,
    UsageCell,
)

__all__ = [
    "ApiKey",
    "Assignment",
    "Demand",
    "GatewayRecord",
    "Gpu",
    "HarvestJob",
    "HarvestJobState",
    "HarvestStatus",
    "InstanceRecord",
    "InstanceState",
    "KeyLoad",
    "ModelAccess",
    "ModelSpec",
    "NodeControl",
    "NodeRecord",
    "PlanAction",
    "PlanRecord",
    "SlurmJob",
    "Usage",
    "UsageBlock",
    "UsageCell",
]
