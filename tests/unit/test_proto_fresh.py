"""The checked-in protobuf code must match proto/ (regenerate: python -m controlplane.protogen)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2

from controlplane import protogen
from controlplane.pb import records_pb2


def test_generated_code_matches_the_proto_sources() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        protogen.compile_protos(Path(tmp), f"--descriptor_set_out={out}")
        fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    # The embedded descriptor omits json_name (derived from the field name); compare the rest.
    for message in fresh.message_type:
        _clear_json_names(message)
    checked_in = descriptor_pb2.FileDescriptorProto.FromString(records_pb2.DESCRIPTOR.serialized_pb)
    assert fresh == checked_in, "controlplane/pb is stale: run `python -m controlplane.protogen` and commit"


def _clear_json_names(message: descriptor_pb2.DescriptorProto) -> None:
    for f in message.field:
        f.ClearField("json_name")
    for nested in message.nested_type:
        _clear_json_names(nested)


def test_records_round_trip_and_unknown_fields_survive() -> None:
    from controlplane.pb import InstanceRecord, InstanceState

    rec = InstanceRecord(instance_id="i1", model="m", state=InstanceState.READY, endpoint="http://h:1")
    data = rec.SerializeToString() + b"\xa8\x1f\x01"  # field 500, varint 1: a field from a newer schema
    back = InstanceRecord.FromString(data)
    assert back.model == "m" and back.state == InstanceState.READY
    assert back.SerializeToString().endswith(b"\xa8\x1f\x01")
