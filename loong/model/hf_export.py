"""A loaded model -> a Hugging Face checkpoint directory (`export_hf`, and its command line).

Owns: writing `config.json` (the ModelConfig in transformers' Llama / Mistral / Qwen2
spelling), `generation_config.json`, `model.safetensors` (the weights by their Hugging Face
names, cast to one dtype, bfloat16 by default) and the tokenizer files
(`Tokenizer.save_pretrained`: tokenizer.json + tokenizer_config.json with the chat
template). It is the inverse of `hf_loader.load_hf_dir`: the loaders already hold weights in
Hugging Face layout (the GGUF loader undoes llama.cpp's Q/K row permutation), so tensors are
written as they are, only cast; a directory written here loads back to the same tensors
(exactly so in float32) and runs in transformers, vLLM or SGLang.

    python -m loong.model.hf_export --out DIR [--model PATH] [--dtype bfloat16|float32]

Must not import transformers (tests use it as the reference), nor the model code.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch

from loong.errors import ModelLoadError
from loong.model.config import ModelConfig
from loong.model.loader import LoadedModel, load_model_files

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
_MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                "Qwen2ForCausalLM": "qwen2"}


def _one_or_list(ids: tuple[int, ...]) -> int | list[int] | None:
    if not ids:
        return None
    return ids[0] if len(ids) == 1 else list(ids)


def hf_config_dict(config: ModelConfig, dtype: str = "bfloat16") -> dict[str, Any]:
    """`config.json` of `config` (what `ModelConfig.from_hf_dict` reads back to it)."""
    arch = config.architecture
    if arch not in _MODEL_TYPES:
        raise ModelLoadError(f"cannot export architecture {arch!r}; supported: {sorted(_MODEL_TYPES)}")
    out: dict[str, Any] = {
        "architectures": [arch], "model_type": _MODEL_TYPES[arch],
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
        "rope_scaling": dict(config.rope_scaling) if config.rope_scaling else None,
        "hidden_act": "silu", "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id, "eos_token_id": _one_or_list(config.eos_token_ids),
        "initializer_range": 0.02, "use_cache": True, "torch_dtype": dtype,
    }
    if arch != "LlamaForCausalLM":
        out["sliding_window"] = None     # transformers' Mistral default is 4096; Loong has none
    if arch == "Qwen2ForCausalLM":
        if config.o_proj_bias:
            raise ModelLoadError("Qwen2ForCausalLM has no o_proj bias; this model cannot be "
                                 "written as a Qwen2 checkpoint")
        if not config.attention_bias:
            raise ModelLoadError("Qwen2ForCausalLM always has q/k/v biases; this model has none")
    elif arch == "MistralForCausalLM" and (config.attention_bias or config.o_proj_bias):
        raise ModelLoadError("MistralForCausalLM has no attention biases; this model has some")
    else:
        # Llama's one `attention_bias` covers q, k, v and o together.
        if config.attention_bias != config.o_proj_bias:
            raise ModelLoadError(f"{arch} biases q/k/v/o all or none; this model has q/k/v "
                                 f"bias {config.attention_bias}, o_proj bias {config.o_proj_bias}")
        out["attention_bias"] = config.attention_bias
        out["mlp_bias"] = False
        out["pretraining_tp"] = 1
    return out


def generation_config_dict(loaded: LoadedModel) -> dict[str, Any]:
    """`generation_config.json`: the source's own (an HF one), with BOS/EOS ids filled in."""
    out = dict(loaded.generation_config)
    out.setdefault("bos_token_id", loaded.config.bos_token_id)
    out["eos_token_id"] = _one_or_list(loaded.config.eos_token_ids)
    return out


def export_weights(loaded: LoadedModel, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor by its Hugging Face name, cast to `dtype`, contiguous (no shared storage:
    a tied model has no `lm_head.weight`, the config's tie_word_embeddings says so)."""
    return {name: t.detach().to("cpu", dtype).contiguous().clone()
            for name, t in sorted(loaded.weights.items())}


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


def export_hf(loaded: LoadedModel, out_dir: str | os.PathLike, dtype: str = "bfloat16") -> str:
    """Write `loaded` as a Hugging Face directory at `out_dir`; returns its absolute path."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ValueError(f"dtype: must be one of {sorted(DTYPES)}, got {dtype!r}")
    out = os.path.abspath(os.fspath(out_dir))
    os.makedirs(out, exist_ok=True)
    stale = sorted(f for f in os.listdir(out) if f != "model.safetensors" and (
        f.endswith(".safetensors") or f == "model.safetensors.index.json"
        or (f.startswith("pytorch_model") and f.endswith(".bin"))))
    if stale:
        raise ModelLoadError(f"{out!r} already holds other weights {stale}, which a loader "
                             "would read instead; export into an empty directory")
    _write_json(os.path.join(out, "config.json"), hf_config_dict(loaded.config, dtype))
    _write_json(os.path.join(out, "generation_config.json"), generation_config_dict(loaded))
    save_file(export_weights(loaded, DTYPES[dtype]), os.path.join(out, "model.safetensors"),
              metadata={"format": "pt"})
    loaded.tokenizer.save_pretrained(out)
    cfg_path = os.path.join(out, "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        tok_cfg = json.load(f)
    changed = False
    if loaded.tokenizer.chat_template and "chat_template" not in tok_cfg:
        tok_cfg["chat_template"] = loaded.tokenizer.chat_template
        changed = True
    max_len = loaded.config.max_position_embeddings
    if tok_cfg.get("model_max_length") != max_len:
        tok_cfg["model_max_length"] = max_len
        changed = True
    if changed:
        _write_json(cfg_path, tok_cfg)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loong.model.hf_export",
                                description="Write a model Loong loads as a Hugging Face "
                                            "directory (config, safetensors, tokenizer)")
    p.add_argument("--out", required=True, help="the directory to write")
    p.add_argument("--model", default=None,
                   help="GGUF file or Hugging Face directory (default: the embedded "
                        "SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    a = p.parse_args(argv)
    try:
        loaded = load_model_files(a.model)
        path = export_hf(loaded, a.out, a.dtype)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {loaded.source} as a Hugging Face {a.dtype} checkpoint to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
