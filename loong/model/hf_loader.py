"""Hugging Face checkpoint directories -> (ModelConfig, tensors, Tokenizer, generation config).

Owns: reading `config.json`, `generation_config.json`, safetensors weights (one file, an
index with shards, or several loose files; `pytorch_model*.bin` as a fallback) and the
tokenizer files of one local directory.
Must not import transformers (only the tests' reference) nor the model code; tensor names
stay Hugging Face's and `loader.py` validates their shapes.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any

import torch

from loong.errors import ModelLoadError
from loong.model.config import ModelConfig
from loong.model.tokenizer import Tokenizer


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path!r}: {e}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path!r} does not hold a JSON object")
    return data


def read_config(directory: str) -> tuple[ModelConfig, dict[str, Any]]:
    """`config.json` as a ModelConfig (+ the raw dict)."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ModelLoadError(f"no config.json in {directory!r}: a Hugging Face model directory "
                             "needs config.json, *.safetensors and tokenizer.json")
    raw = _read_json(path)
    act = raw.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ModelLoadError(f"config.json field 'hidden_act' is {act!r}; Loong supports 'silu'")
    if raw.get("mlp_bias"):
        raise ModelLoadError("config.json field 'mlp_bias' is true; Loong's MLP has no biases")
    return ModelConfig.from_hf_dict(raw), raw


def _safetensors_files(directory: str) -> list[str]:
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index!r} has no 'weight_map'")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
        if missing:
            raise ModelLoadError(f"{index!r} names shard(s) {missing} that are not in {directory!r}")
        return [os.path.join(directory, f) for f in files]
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    return sorted(glob.glob(os.path.join(directory, "*.safetensors")))


def read_weights(directory: str) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, in the file's own dtype."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    files = _safetensors_files(directory)
    for path in files:
        try:
            weights.update(load_file(path))
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"cannot read safetensors file {path!r}: {e}") from None
    if not files:
        bins = sorted(glob.glob(os.path.join(directory, "pytorch_model*.bin")))
        if not bins:
            raise ModelLoadError(f"no *.safetensors (or pytorch_model*.bin) weights in {directory!r}")
        for path in bins:
            try:
                weights.update(torch.load(path, map_location="cpu", weights_only=True))
            except Exception as e:  # pickle / zip errors of many kinds
                raise ModelLoadError(f"cannot read {path!r}: {e}") from None
    # Some exports prefix names (e.g. "_orig_mod." from torch.compile); strip known wrappers.
    for prefix in ("_orig_mod.", "module."):
        if weights and all(k.startswith(prefix) for k in weights):
            weights = {k[len(prefix):]: v for k, v in weights.items()}
    return weights


def read_generation_config(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, "generation_config.json")
    return _read_json(path) if os.path.isfile(path) else {}


def load_hf_dir(directory: str) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer, dict]:
    """Read one Hugging Face checkpoint directory (nothing is downloaded)."""
    config, _ = read_config(directory)
    generation_config = read_generation_config(directory)
    tokenizer = Tokenizer.from_pretrained(directory)
    weights = read_weights(directory)
    return config, weights, tokenizer, generation_config
