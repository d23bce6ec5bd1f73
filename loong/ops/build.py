"""Building and loading the native CPU kernels of csrc/cpu (the extension `loong_cpu_ops`).

Owns: the build recipe a setup.py-time build can reuse (`EXTENSION_NAME`, `extension_sources`,
`EXTRA_CFLAGS`, `EXTRA_LDFLAGS`, `cflags`), the per-machine build cache (`build_dir`: its
location and key), `csrc_disabled` (LOONG_DISABLE_CSRC) and `load_extension` (a prebuilt
`loong._loong_cpu_ops` if importable, else a just-in-time build with torch.utils.cpp_extension).
The cache is described in the `loong.ops` docstring; the key hashes each source's and header's
file name and contents, the torch and Python versions, the compiler and linker flags
(LOONG_CSRC_CFLAGS included) and the CPU's model and feature flags.

Must not import: any loong module (the standard library and torch only); loading state (tried
once, the error, the warning) belongs to `loong.ops`, not here.
"""
from __future__ import annotations

import hashlib
import importlib
import logging
import os
import time
import sys
from typing import List

import torch

__all__ = ["EXTENSION_NAME", "EXTRA_CFLAGS", "EXTRA_LDFLAGS", "SOURCE_FILES", "HEADER_FILES",
           "CSRC_DIR", "extension_sources", "extension_headers", "cflags", "build_dir",
           "csrc_disabled", "load_extension"]

log = logging.getLogger("loong.ops")

EXTENSION_NAME = "loong_cpu_ops"
EXTRA_CFLAGS = ["-O3", "-march=native", "-fopenmp"]
EXTRA_LDFLAGS = ["-fopenmp"]
SOURCE_FILES = ("paged_attention.cpp", "lse_merge.cpp", "prefill_attention.cpp",
                "fused_elementwise.cpp", "kv_pack.cpp", "skinny_linear.cpp",
                "decoder_step.cpp", "argmax.cpp", "q8_linear.cpp", "vnni_linear.cpp",
                "bindings.cpp")
# Headers the sources include (from csrc/cpu): part of the cache key, so a change to one rebuilds.
HEADER_FILES = ("skinny_tiles.h",)
# This file is <repo>/loong/ops/build.py; the sources are <repo>/csrc/cpu.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSRC_DIR = os.path.join(_REPO_ROOT, "csrc", "cpu")
_PREBUILT = "loong._loong_cpu_ops"


def extension_sources() -> List[str]:
    """Absolute paths of the C++ sources of `loong_cpu_ops`."""
    return [os.path.join(CSRC_DIR, f) for f in SOURCE_FILES]


def extension_headers() -> List[str]:
    """Absolute paths of the headers the sources of `loong_cpu_ops` include."""
    return [os.path.join(CSRC_DIR, f) for f in HEADER_FILES]


def _cpu_signature() -> str:
    """The CPU model and feature flags (what -march=native compiles for)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
        keep = [ln for ln in lines if ln.startswith(("flags", "model name", "vendor_id"))]
        return "\n".join(sorted(set(keep)))
    except OSError:
        import platform
        return f"{platform.machine()} {platform.processor()}"


def cflags() -> List[str]:
    """EXTRA_CFLAGS plus any from LOONG_CSRC_CFLAGS (e.g. '-march=x86-64-v3' for a binary that
    runs on older CPUs, or '-mno-avx512f' to test the scalar code)."""
    return EXTRA_CFLAGS + os.environ.get("LOONG_CSRC_CFLAGS", "").split()


def build_dir(sources: List[str]) -> str:
    """The cache directory for a build of `sources` on this machine (see the module docstring
    for what the key covers); `LOONG_EXTENSIONS_DIR` replaces ~/.cache/loong/torch_extensions."""
    h = hashlib.sha256()
    for path in list(sources) + extension_headers():
        with open(path, "rb") as f:
            h.update(os.path.basename(path).encode() + b"\0" + f.read() + b"\0")
    h.update(f"torch={torch.__version__} python={sys.version_info[:2]} "
             f"cflags={cflags()} ldflags={EXTRA_LDFLAGS}".encode())
    h.update(_cpu_signature().encode())
    root = os.environ.get("LOONG_EXTENSIONS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "loong", "torch_extensions")
    return os.path.join(root, h.hexdigest()[:20])


def csrc_disabled() -> bool:
    """True if LOONG_DISABLE_CSRC asks for the torch implementations only."""
    return os.environ.get("LOONG_DISABLE_CSRC", "").strip().lower() not in ("", "0", "false",
                                                                            "no")


def load_extension():
    """Import the prebuilt module or JIT-build it (cached per machine); raises on failure."""
    try:
        return importlib.import_module(_PREBUILT)
    except ImportError:
        pass
    sources = extension_sources()
    missing = [s for s in sources if not os.path.exists(s)]
    if missing:
        raise FileNotFoundError(f"C++ sources not found: {missing}")
    from torch.utils import cpp_extension

    directory = build_dir(sources)
    os.makedirs(directory, exist_ok=True)
    clear_stale_lock(directory)
    log.info("loong.ops: loading %s from %s (the first build on a machine takes about a "
             "minute)", EXTENSION_NAME, directory)
    verbose = os.environ.get("LOONG_CSRC_VERBOSE", "") not in ("", "0")
    return cpp_extension.load(name=EXTENSION_NAME, sources=sources, extra_cflags=cflags(),
                              extra_ldflags=EXTRA_LDFLAGS, build_directory=directory,
                              verbose=verbose)


STALE_LOCK_S = 600.0     # a build takes about a minute; a lock this old has no owner left


def clear_stale_lock(directory: str) -> None:
    """torch's build lock is a file; a build killed midway leaves it behind and every later
    process would wait on it forever. Remove one older than STALE_LOCK_S."""
    lock = os.path.join(directory, "lock")
    try:
        age = time.time() - os.path.getmtime(lock)
    except OSError:
        return
    if age > STALE_LOCK_S:
        log.warning("loong.ops: removing a build lock left %.0f s ago by a build that did not "
                    "finish (%s)", age, lock)
        try:
            os.remove(lock)
        except OSError:
            pass
