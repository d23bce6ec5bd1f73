"""Where a weight update's tensors come from: named tensors in memory or a checkpoint path.

Owns: `named_weights(source)`, which turns what `LLM.update_weights` accepts into a list of
(Hugging Face name, tensor) pairs: a mapping (a state dict), an iterable of pairs, or the
path of a `.safetensors` file or of a directory of them (a Hugging Face checkpoint, sharded
or not). Names and shapes are checked later against the model
(`loong.model.weight_names.check_weight_update`).
Must not import: the engine, the model code, the cluster runtime.
"""
from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Mapping
from typing import Any

from loong.errors import InvalidRequestError


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
