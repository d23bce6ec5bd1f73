"""Prefill logits of the engine's model equal transformers' on the same weights (fp32).

The default GGUF model, and tiny random Hugging Face checkpoints written by the test
(GQA, qkv bias, rope scaling, untied head) loaded through our loader and run through the
engine's paged, chunked path.
"""
import pytest
import torch

from loong import LLM, SamplingParams
from loong.model.loader import load_model_files
from tests.helpers_models import write_tiny_hf_checkpoint


def engine_prefill_logits(llm, ids):
    """All-position logits from our model through the paged attention path (chunked)."""
    from loong.attention.paged_context import PagedAttention
    from loong.sched.cluster_plan import ChunkItem
    from loong.worker.replica_step import prepare_chunks

    worker = llm.engine.executor.worker        # the in-process instance
    pool = worker.pool
    blocks = pool.allocate(pool.blocks_for_tokens(len(ids)))
    try:
        rows = []
        chunk = 37  # odd chunk size: exercises context + causal merge across block edges
        for start in range(0, len(ids), chunk):
            part = ids[start:start + chunk]
            chunks = [ChunkItem("r", tuple(part), start, False, ())]
            t_ids, pos, meta, _, dyn = prepare_chunks(chunks, [blocks], pool.block_size,
                                                      worker.model.device)
            with torch.no_grad():
                hidden = worker.model(t_ids, pos, PagedAttention(worker.cache, meta, worker.scale),
                                      dyn)
                rows.append(worker.model.logits(hidden))
        return torch.cat(rows)
    finally:
        pool.free(blocks)


def test_default_model_logits(loaded_default, hf_default, long_text):
    ids = loaded_default.tokenizer.encode(long_text)[:300]
    llm = LLM(loaded=loaded_default, dtype="float32", block_size=16)
    ours = engine_prefill_logits(llm, ids)
    with torch.no_grad():
        ref = hf_default(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=1e-4)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


TINY = {
    "gqa_untied": dict(num_attention_heads=4, num_key_value_heads=2),
    "mqa_tied": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True),
    "llama_bias_linear_rope": dict(attention_bias=True, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}),
    "llama3_rope": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 128}),
}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    out = {}
    for name, overrides in TINY.items():
        out[name] = write_tiny_hf_checkpoint(tmp_path_factory.mktemp(name), **overrides)
    out["qwen2"] = write_tiny_hf_checkpoint(tmp_path_factory.mktemp("qwen2"), model_type="qwen2",
                                            max_shard_size="2MB")
    return out


@pytest.mark.parametrize("name", list(TINY) + ["qwen2"])
def test_tiny_checkpoint_logits_and_greedy(tiny_dirs, name):
    import transformers

    path = str(tiny_dirs[name])
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    loaded = load_model_files(path)
    llm = LLM(loaded=loaded, dtype="float32", block_size=4, max_num_batched_tokens=32)
    ids = torch.randint(5, loaded.config.vocab_size, (150,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(engine_prefill_logits(llm, ids), ref, atol=1e-4, rtol=1e-4)
    # greedy decode through the engine (chunked prefill + paged decode) equals generate
    gen = transformers.GenerationConfig(max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        exp = hf.generate(torch.tensor([ids[:60]]), generation_config=gen,
                          attention_mask=torch.ones(1, 60, dtype=torch.long))[0, 60:].tolist()
    (out,) = llm.generate([ids[:60]], SamplingParams(max_tokens=len(exp), temperature=0, ignore_eos=True))
    assert out.token_ids == exp
