"""Handing the manager's loaded model to local instance processes: written once, mapped by each.

Owns: the handoff format (one safetensors file: the Hugging Face-named tensors as the
manager loaded them, and the `ModelConfig` fields as JSON in its metadata), where it lives
(/dev/shm when it exists and has room, else the temp directory), writing it, reading it in
an instance (memory-mapped: instances on one machine share the pages) and releasing it.
On Linux the file is unlinked as soon as it is written: instances inherit an open
descriptor (`pass_fds`) and read it as /proc/self/fd/N, so nothing is left behind even if
the manager is killed, and the memory goes when the last instance has copied the weights.
Elsewhere the file keeps its name until `release()`.
Must not import: the engine, the executor or serving code (the instance process imports
this module); torch is imported only by `write` and `read`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

from loong.model.config import ModelConfig

SHM_DIR = "/dev/shm"
FD_DIR = "/proc/self/fd"          # where a process finds its open files by number (Linux)
PREFIX = "loong-weights-"
CONFIG_KEY = "loong.model_config"


@dataclasses.dataclass
class Handoff:
    """One written model. `path`: what an instance opens; `pass_fds`: descriptors the
    instance must inherit for it; `release()` closes and removes what is left here."""

    path: str
    fd: int | None = None          # the open, unlinked file (Linux)
    directory: str | None = None   # the private directory still holding the file

    @property
    def pass_fds(self) -> tuple[int, ...]:
        return () if self.fd is None else (self.fd,)

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


def write(model_config: ModelConfig, weights: dict) -> Handoff:
    """Write the model once for every instance to read (nothing is left on failure)."""
    from safetensors.torch import save_file

    tensors = _unshared(weights)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    directory = tempfile.mkdtemp(prefix=PREFIX, dir=_base_dir(nbytes))     # mode 0700
    path = os.path.join(directory, "weights.safetensors")
    try:
        save_file(tensors, path,
                  metadata={CONFIG_KEY: json.dumps(dataclasses.asdict(model_config))})
        if not os.path.isdir(FD_DIR):
            return Handoff(path, directory=directory)
        fd = os.open(path, os.O_RDONLY)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    shutil.rmtree(directory, ignore_errors=True)     # from now on only descriptors hold it
    return Handoff(f"{FD_DIR}/{fd}", fd=fd)


def read(path: str) -> tuple[ModelConfig, dict]:
    """(ModelConfig, weights) of a handoff; closes the inherited descriptor it names. The
    tensors map the file: drop them once copied into the model, so its memory can go."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        fields = json.loads(f.metadata()[CONFIG_KEY])
        weights = {name: f.get_tensor(name) for name in f.keys()}
    if os.path.dirname(path) == FD_DIR:
        os.close(int(os.path.basename(path)))
    # JSON has no tuples; the frozen config keeps its sequences (eos_token_ids) as tuples.
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    return ModelConfig(**fields), weights


def _base_dir(nbytes: int) -> str:
    """/dev/shm (memory) when it exists with room to spare, else the temp directory."""
    try:
        st = os.statvfs(SHM_DIR)
        if st.f_bavail * st.f_frsize > nbytes + (64 << 20):
            return SHM_DIR
    except OSError:
        pass
    return tempfile.gettempdir()


def _unshared(weights: dict) -> dict:
    """Contiguous CPU tensors with no storage shared between names (safetensors refuses
    aliases: a tensor whose storage another name already uses is copied)."""
    out, seen = {}, set()
    for name, t in weights.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[name] = t
    return out
