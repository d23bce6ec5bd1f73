"""Where a weight update's tensors come from: named tensors in memory or a checkpoint path.

Owns: `named_weights(source)`, which turns what `LLM.update_weights` accepts into a list of
(Hugging Face name, tensor) pairs: a mapping (a state dict), an iterable of pairs, or the
path of a `.safetensors` file or of a directory of them (a Hugging Face checkpoint, sharded
or not; names and shapes are checked later against the model,
`loong.model.weight_names.check_weight_update`); and the argument checks of updates over
torch.distributed (`check_group_args`, `check_distributed_update`), so a bad call raises
InvalidRequestError naming the field before any instance is asked.
Must not import: the engine, the model code (`llama.py`), the cluster runtime.
"""
from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Mapping
from typing import Any

from loong.errors import InvalidRequestError
from loong.model.config import ModelConfig
from loong.model.weight_names import check_weight_update


def named_weights(source: Any, field: str = "weights") -> list[tuple[str, Any]]:
    """(name, tensor) pairs from a mapping, an iterable of pairs, or a safetensors path."""
    if isinstance(source, (str, os.PathLike)):
        return _from_path(os.fspath(source), field)
    if isinstance(source, Mapping):
        return list(source.items())
    if isinstance(source, Iterable):
        pairs = []
        for item in source:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise InvalidRequestError(field, f"expected (name, tensor) pairs, got {item!r:.80}")
            pairs.append(item)
        return pairs
    raise InvalidRequestError(field, f"expected a state dict, (name, tensor) pairs or a "
                              f"safetensors path, got {type(source).__name__}")


def _from_path(path: str, field: str) -> list[tuple[str, Any]]:
    from safetensors.torch import load_file
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise InvalidRequestError(field, f"no .safetensors file in {path!r}")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise InvalidRequestError(field, f"{path!r} does not exist (a .safetensors file or a "
                                  f"directory of them)")
    pairs: list[tuple[str, Any]] = []
    for f in files:
        try:
            pairs += list(load_file(f).items())
        except Exception as e:        # noqa: BLE001 - a corrupt or foreign file
            raise InvalidRequestError(field, f"cannot read {f!r}: {e}") from None
    return pairs


def check_group_args(port: Any, world_size: Any, rank_offset: Any, instances: int) -> None:
    """A weight-update group of `world_size` (the trainer is rank 0) that holds `instances`
    instances from rank `rank_offset`, at a TCP port."""
    if not isinstance(world_size, int) or world_size < 2:
        raise InvalidRequestError("world_size", f"must be an int >= 2, got {world_size!r}")
    if (not isinstance(rank_offset, int) or rank_offset < 1
            or rank_offset + instances > world_size):
        raise InvalidRequestError("rank_offset", f"{instances} instance(s) from rank "
                                  f"{rank_offset} do not fit a group of {world_size} (rank 0 "
                                  f"is the trainer)")
    if not isinstance(port, int) or not 0 < port < 65536:
        raise InvalidRequestError("port", f"must be a TCP port, got {port!r}")


class _Shaped:
    """A shape standing for a tensor not here yet (checked before a broadcast)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = tuple(shape)


def check_distributed_update(cfg: ModelConfig, names, dtypes, shapes
                             ) -> tuple[list[str], list[str], list[tuple[int, ...]]]:
    """(names, dtypes, shapes) of a broadcast update as lists, checked: one length, torch
    dtype names, and names and shapes the model has."""
    from loong.weight_sync import dtype_from_name
    names, dtypes, shapes = list(names), list(dtypes), [tuple(s) for s in shapes]
    if not len(names) == len(dtypes) == len(shapes) or not names:
        raise InvalidRequestError("names", f"names, dtypes and shapes must be non-empty lists "
                                  f"of one length (got {len(names)}, {len(dtypes)}, "
                                  f"{len(shapes)})")
    for dt in dtypes:
        try:
            dtype_from_name(dt)
        except ValueError as e:
            raise InvalidRequestError("dtypes", str(e).split(": ", 1)[-1]) from None
    check_weight_update(cfg, zip(names, map(_Shaped, shapes)), "names")
    return names, dtypes, shapes
