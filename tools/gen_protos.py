"""Regenerate the committed gRPC stubs in zostream/v1/ from proto/zostream/v1/*.proto.

    python tools/gen_protos.py          # rewrite the stubs in place
    python tools/gen_protos.py --check  # regenerate into a temp dir; exit 1 listing stale files

The stubs are committed so that installing zostream needs no protoc. Output is compared byte for
byte, so regenerate with the grpcio-tools version the stubs were made with (the version stamped in
`*_pb2.py` / `*_pb2_grpc.py`); a different version changes those stamps and shows them as stale.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PACKAGE = Path("zostream") / "v1"  # the proto package's folder, relative to PROTO_ROOT and to ROOT
STUB_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    """The .proto sources, relative to PROTO_ROOT (protoc names outputs after these paths)."""
    return sorted(p.relative_to(PROTO_ROOT) for p in (PROTO_ROOT / PACKAGE).glob("*.proto"))


def is_stub(path: Path) -> bool:
    return path.name.endswith(STUB_SUFFIXES)


def _protoc(*outputs: str) -> None:
    """Run the protoc bundled with grpcio-tools on every source with the given output flags."""
    from grpc_tools import protoc  # a dev dependency: imported here so `--help` works without it

    sources = proto_files()
    if not sources:
        raise RuntimeError(f"no .proto files under {PROTO_ROOT / PACKAGE}")
    # google/protobuf/*.proto (timestamp.proto) ship inside grpc_tools.
    well_known = resources.files("grpc_tools") / "_proto"
    # Absolute source paths under an -I root: protoc names them relative to it (zostream/v1/x.proto),
    # and that name fixes both the output paths and the generated imports.
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", *outputs, *(str(PROTO_ROOT / p) for p in sources)]
    rc = protoc.main(args)  # argv[0] is ignored
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc} (its messages are above)")


def generate(out_root: Path) -> list[Path]:
    """Write the stubs under out_root (which mirrors the repo root); returns their paths relative to it."""
    _protoc(f"--python_out={out_root}", f"--grpc_python_out={out_root}", f"--pyi_out={out_root}")
    return sorted(p.relative_to(out_root) for p in (out_root / PACKAGE).iterdir() if is_stub(p))


def descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    """The sources' descriptors with their comments (source info): what the API docs are made from."""
    with tempfile.TemporaryDirectory(prefix="zostream-protos-") as tmp:
        out = Path(tmp) / "api.pb"
        _protoc(f"--descriptor_set_out={out}", "--include_source_info")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def stale_files() -> list[str]:
    """Stub files that differ from a fresh generation, are missing, or have no .proto any more."""
    with tempfile.TemporaryDirectory(prefix="zostream-protos-") as tmp:
        fresh = set(generate(Path(tmp)))
        committed = {p.relative_to(ROOT) for p in (ROOT / PACKAGE).glob("*") if is_stub(p)}
        stale = [
            str(rel)
            for rel in sorted(fresh | committed)
            if rel not in fresh
            or rel not in committed
            or not filecmp.cmp(Path(tmp) / rel, ROOT / rel, shallow=False)
        ]
    return stale


def write() -> list[str]:
    """Regenerate in place: fresh stubs replace the committed ones; stubs of deleted protos go."""
    with tempfile.TemporaryDirectory(prefix="zostream-protos-") as tmp:
        fresh = generate(Path(tmp))
        for old in (ROOT / PACKAGE).glob("*"):
            if is_stub(old) and old.relative_to(ROOT) not in fresh:
                old.unlink()
        for rel in fresh:
            shutil.copyfile(Path(tmp) / rel, ROOT / rel)
    return [str(p) for p in fresh]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed stubs are stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: {name}", file=sys.stderr)
        if stale:
            print("regenerate with: python tools/gen_protos.py", file=sys.stderr)
        return 1 if stale else 0
    for name in write():
        print(f"wrote {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
