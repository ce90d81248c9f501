"""Generate the protobuf/gRPC stubs in baton/v1/ from proto/baton/v1/*.proto.

`make proto` runs this; tests/unit/test_protos.py fails when the committed stubs differ from what
this would generate. grpc_tools is a development dependency only.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "baton" / "v1"


def proto_files() -> list[Path]:
    return sorted((PROTO_DIR / "baton" / "v1").glob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Generate stubs under out_root/baton/v1 and return the generated files."""
    import grpc_tools
    from grpc_tools import protoc  # dev dependency

    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(p.relative_to(PROTO_DIR)) for p in proto_files()],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    return sorted((out_root / "baton" / "v1").glob("*_pb2*.py*"))


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp))
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        for f in files:
            (OUT_DIR / f.name).write_bytes(f.read_bytes())
            print(f"wrote baton/v1/{f.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
