"""Building one instance: its device and dtype, model replica, KV block pool and storage.

Owns: `resolve_device` / `resolve_dtype` (the "auto" rules), the default KV budget, and
`build_instance`, which the in-process cluster of one and every instance process use, so
an instance is built the same way wherever it runs.
Must not import: the engine, the cluster runtime, serving or scheduling policies.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from loong.errors import InvalidRequestError
from loong.kv.block_pool import BlockPool
from loong.kv.cache_pool import KVCachePool, num_blocks_for
from loong.model.llama import LlamaModel

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_DEFAULT_KV_BYTES = 2 << 30      # all instances of a CPU machine together


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError("device", "CUDA was asked for but torch sees no GPU; use device='cpu'")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16
    dtype = _TORCH_DTYPES[name]
    if dtype is torch.float16 and device.type == "cpu":
        raise InvalidRequestError("dtype", "float16 is supported on CUDA only; use bfloat16 or float32 on CPU")
    return dtype


@dataclass(frozen=True)
class InstanceParts:
    model: LlamaModel
    pool: BlockPool
    cache: KVCachePool
    eos_token_ids: tuple[int, ...]


def build_instance(model_config, weights, *, device: str, dtype: str, block_size: int,
                   kv_capacity_tokens: int | None, kv_memory_bytes: int | None,
                   max_model_len: int | None, instances: int, rank: int = 0,
                   weight_dtype: str = "auto") -> InstanceParts:
    """Model replica (weights loaded, eval mode, projections rounded to Q8_0 when
    weight_dtype is "q8_0") and KV of one instance of `instances`.

    KV: kv_capacity_tokens, else kv_memory_bytes, else 90% of free GPU memory on CUDA or
    an equal share of CPU_DEFAULT_KV_BYTES on CPU."""
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", rank % torch.cuda.device_count())
    dt = resolve_dtype(dtype, dev)
    if weight_dtype == "q8_0" and dev.type != "cpu":
        raise InvalidRequestError("weight_dtype", "q8_0 weights run on CPU only; use "
                                  "weight_dtype='auto' on CUDA")
    max_len = max_model_len or model_config.max_position_embeddings
    model = LlamaModel(model_config, dt, dev, max_positions=max_len)
    model.load_hf_weights(weights)
    if weight_dtype == "q8_0":
        model.quantize_q8_0()
    model.eval()
    if kv_capacity_tokens is None and kv_memory_bytes is None:
        if dev.type == "cuda":
            kv_memory_bytes = int(torch.cuda.mem_get_info(dev)[0] * 0.9)
        else:
            kv_memory_bytes = CPU_DEFAULT_KV_BYTES // max(1, instances)
    blocks = num_blocks_for(model_config, dt, block_size, kv_capacity_tokens, kv_memory_bytes)
    pool = BlockPool(blocks, block_size)
    cache = KVCachePool(model_config, blocks, block_size, dt, dev)
    return InstanceParts(model, pool, cache, tuple(model_config.eos_token_ids))
