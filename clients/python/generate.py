#!/usr/bin/env python3
"""Regenerates the committed gRPC stubs in minibatch_client/_proto/ from
../../proto/minibatch/v1/minibatch.proto with grpcio-tools.

    python clients/python/generate.py           # rewrite the stubs
    python clients/python/generate.py --check   # exit 1 if they are stale

The stubs are committed (not generated at install time) so that
`pip install ./clients/python` needs neither grpcio-tools nor the proto tree.
The output depends on the grpcio-tools version (requirements-test.txt pins it);
tests/python/test_client.py runs `--check` so the stubs never drift from the
proto.

protoc names the modules after the proto path (minibatch/v1/minibatch_pb2.py,
imported as `minibatch.v1.minibatch_pb2`); this script moves them into the
package and makes the one cross-import relative. The descriptor keeps its
canonical file name "minibatch/v1/minibatch.proto", so it registers in the
protobuf pool under the same name as any other copy of the contract.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto"
PROTO = "minibatch/v1/minibatch.proto"
OUT = HERE / "minibatch_client" / "_proto"
FILES = ["minibatch_pb2.py", "minibatch_pb2.pyi", "minibatch_pb2_grpc.py"]
ABSOLUTE_IMPORT = "from minibatch.v1 import minibatch_pb2 as"
RELATIVE_IMPORT = "from . import minibatch_pb2 as"


def generate() -> dict[str, bytes]:
    """The stub files, freshly generated, by name."""
    try:
        from grpc_tools import protoc
    except ImportError:
        sys.exit("grpcio-tools is not installed: pip install -r requirements-test.txt")
    import importlib.resources

    include = str(importlib.resources.files("grpc_tools") / "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main([
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            PROTO,
        ])
        if rc != 0:
            sys.exit(f"protoc failed with exit code {rc}")
        gen = Path(tmp) / "minibatch" / "v1"
        out = {name: (gen / name).read_bytes() for name in FILES}
    grpc_py = out["minibatch_pb2_grpc.py"].decode()
    if ABSOLUTE_IMPORT not in grpc_py:
        sys.exit(f"generated minibatch_pb2_grpc.py lacks {ABSOLUTE_IMPORT!r}: grpcio-tools changed its output")
    out["minibatch_pb2_grpc.py"] = grpc_py.replace(ABSOLUTE_IMPORT, RELATIVE_IMPORT).encode()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 when stale")
    args = ap.parse_args()
    fresh = generate()
    if args.check:
        stale = [n for n, data in fresh.items() if not (OUT / n).is_file() or (OUT / n).read_bytes() != data]
        if stale:
            print(f"stale stubs in {OUT}: {', '.join(stale)}; run python {Path(__file__).name} "
                  f"(with the grpcio-tools of requirements-test.txt)", file=sys.stderr)
            return 1
        print(f"stubs in {OUT} match {PROTO}")
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    for name, data in fresh.items():
        (OUT / name).write_bytes(data)
    print(f"wrote {', '.join(FILES)} to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
