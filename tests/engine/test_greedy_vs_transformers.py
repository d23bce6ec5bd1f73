"""Greedy generations of the engine are token-identical to transformers' `generate`.

Same GGUF file, both in fp32. Covers short prompts in a batch, a prompt over 2,000
tokens, one near the model's 8K context, small block sizes, small chunk budgets and
forced preemption (a KV cache too small for the batch).
"""
import pytest
import torch

from loong import LLM, SamplingParams


def hf_greedy(hf, prompt_ids, n):
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=hf.config.eos_token_id,
                           pad_token_id=0)
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt_ids]), generation_config=cfg,
                          attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
    return out[0, len(prompt_ids):].tolist()


SHORT = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a village by the sea, there lived",
    "List three prime numbers greater than 100:",
]
GREEDY = dict(temperature=0.0)  # both stop at EOS (kept in the output) or after n tokens


@pytest.fixture(scope="module")
def short_case(loaded_default, hf_default):
    tok = loaded_default.tokenizer
    ids = [tok.encode(p) for p in SHORT]
    return ids, [hf_greedy(hf_default, p, 40) for p in ids]


@pytest.mark.parametrize("opts", [
    dict(),                                                      # defaults: block 16, budget 2048
    dict(block_size=1, max_num_batched_tokens=64),
    dict(block_size=4, max_num_batched_tokens=7),                # many small prefill chunks
    dict(block_size=4, kv_capacity_tokens=120, max_num_batched_tokens=32),  # forced preemption
], ids=["default", "block1", "chunk7", "preempt"])
def test_short_batch_matches(loaded_default, short_case, opts):
    ids, expected = short_case
    llm = LLM(loaded=loaded_default, dtype="float32", **opts)
    outs = llm.generate(ids, SamplingParams(max_tokens=40, **GREEDY))
    for o, exp in zip(outs, expected):
        assert o.token_ids == exp
        assert o.finish_reason == ("length" if len(exp) == 40 else "stop")
    if "kv_capacity_tokens" in opts:
        assert llm.engine.policy.stats["preemptions"] > 0
    assert llm.engine.executor.inspect(0, "integrity") is None
    assert llm.engine.executor.inspect(0, "shards")[0] == {}   # every block free or cached


@pytest.mark.parametrize("target,new", [(2100, 24), (8150, 8)], ids=["2k", "8k"])
def test_long_prompt_matches(loaded_default, hf_default, long_text, target, new):
    tok = loaded_default.tokenizer
    ids = tok.encode(long_text)[:target]
    assert len(ids) == target
    expected = hf_greedy(hf_default, ids, new)
    llm = LLM(loaded=loaded_default, dtype="float32", block_size=16, max_num_batched_tokens=1024)
    (out,) = llm.generate([ids], SamplingParams(max_tokens=new, **GREEDY))
    assert out.token_ids == expected
