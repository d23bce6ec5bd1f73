"""Regenerate the Python gRPC code of every .proto under proto/ (into loong/...).

    python proto/generate.py            # rewrite the checked-in files
    python proto/generate.py --check    # exit 1 if they are not current

Needs grpcio-tools (pinned in the test extras: its protoc version is written into the
output, so a different one produces different files).
"""
from __future__ import annotations

import argparse
import filecmp
import os
import sys
import tempfile

PROTO_ROOT = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(PROTO_ROOT)


def proto_files() -> list[str]:
    out = []
    for d, _, names in os.walk(PROTO_ROOT):
        out += [os.path.relpath(os.path.join(d, n), PROTO_ROOT) for n in names if n.endswith(".proto")]
    return sorted(out)


def has_service(proto: str) -> bool:
    with open(os.path.join(PROTO_ROOT, proto)) as f:
        return any(line.lstrip().startswith("service ") for line in f)


def generated_names(proto: str) -> list[str]:
    """The files protoc writes for one proto (no *_pb2_grpc.py for one without services)."""
    stem = proto[:-len(".proto")]
    suffixes = ("_pb2.py", "_pb2.pyi") + (("_pb2_grpc.py",) if has_service(proto) else ())
    return [stem + suffix for suffix in suffixes]


def generate(out_dir: str) -> list[str]:
    """Run protoc on every proto into out_dir; returns the generated paths (relative)."""
    from grpc_tools import protoc
    import grpc_tools
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    files = proto_files()
    rc = protoc.main(["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_dir}",
                      f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *files])
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    for f in files:
        if not has_service(f):       # protoc writes an empty stub; we do not keep it
            os.remove(os.path.join(out_dir, f[:-len(".proto")] + "_pb2_grpc.py"))
    return [g for f in files for g in generated_names(f)]


def stale_files() -> list[str]:
    """Generated files in the repo that differ from a fresh generation (or are missing)."""
    with tempfile.TemporaryDirectory() as tmp:
        return [g for g in generate(tmp)
                if not os.path.exists(os.path.join(REPO, g))
                or not filecmp.cmp(os.path.join(tmp, g), os.path.join(REPO, g), shallow=False)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check the files are current")
    args = ap.parse_args(argv)
    if args.check:
        stale = stale_files()
        for g in stale:
            print(f"stale: {g} (run python proto/generate.py)")
        return 1 if stale else 0
    for g in generate(REPO):
        print(f"wrote {g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
