"""Regenerate the Python code for proto/ into this package.

Run ``python -m controlplane.protogen`` after editing any ``.proto`` file under proto/.
``tests/unit/test_proto_fresh.py`` fails when the checked-in code no longer matches the sources.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO_ROOT / "proto"
OUT_DIR = Path(__file__).resolve().parent / "pb"
SOURCES = ("modelpool/v1/records.proto",)


def compile_protos(out_dir: Path, *extra_args: str) -> None:
    """Run protoc (from grpcio-tools) on SOURCES, writing Python code under ``out_dir``."""
    try:
        from grpc_tools import protoc
    except ImportError as exc:  # grpcio-tools is a dev dependency
        raise SystemExit("grpcio-tools is needed: pip install -e '.[dev]'") from exc
    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", *extra_args, *SOURCES]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed: {' '.join(args)}")


def main() -> None:
    """Generate ``records_pb2.py`` and ``records_pb2.pyi`` next to this file."""
    with tempfile.TemporaryDirectory() as tmp:
        compile_protos(Path(tmp), f"--python_out={tmp}", f"--pyi_out={tmp}")
        for name in ("records_pb2.py", "records_pb2.pyi"):
            shutil.copyfile(Path(tmp) / "modelpool" / "v1" / name, OUT_DIR / name)
    print(f"generated {OUT_DIR}/records_pb2.py from {', '.join(SOURCES)}", file=sys.stderr)


if __name__ == "__main__":
    main()
