"""Generate the gRPC stubs (`hybrid_pb2.py`, `hybrid_pb2_grpc.py`) from `hybrid.proto` with grpcio-tools.

The stubs are committed so the edge needs no grpcio-tools; `tests/test_proto_stubs.py` checks they are
current. Run ``python -m proto.gen_stubs`` after editing the .proto.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
STUBS = ("hybrid_pb2.py", "hybrid_pb2_grpc.py", "hybrid_pb2.pyi")


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    # -I at the repo root so generated imports read `from proto import hybrid_pb2`.
    args = ["protoc", f"-I{HERE.parent}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", str(HERE / "hybrid.proto")]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on proto/hybrid.proto")


def fresh_stubs() -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        return {name: (Path(tmp) / "proto" / name).read_text() for name in STUBS}


def main() -> int:
    for name, text in fresh_stubs().items():
        (HERE / name).write_text(text)
    print(f"wrote {', '.join(STUBS)} in {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
