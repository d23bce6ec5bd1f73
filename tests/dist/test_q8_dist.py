"""weight_dtype="q8_0" reaches instance processes: a 2-instance cluster computes with the
Q8_0-rounded weights (its first-token logits equal a single instance's in Q8_0 mode, not the
plain model's) and generates the same greedy tokens."""
from loong import LLM, SamplingParams
from tests.dist.conftest import start_cluster

PROMPTS = [[5 + (7 * i + 3 * j) % 250 for j in range(n)] for i, n in enumerate((3, 17, 40))]
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def _first_logits(llm):
    eng = llm.engine
    eng.want_logits, eng.logits = True, {}
    try:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    finally:
        eng.want_logits = False
    return [eng.logits[o.request_id] for o in outs]


def test_cluster_computes_with_q8_weights(tiny_loaded, tiny_path):
    plain = LLM(tiny_path, loaded=tiny_loaded, dtype="float32", enable_prefix_caching=False)
    single = LLM(tiny_path, loaded=tiny_loaded, dtype="float32", weight_dtype="q8_0",
                 enable_prefix_caching=False)
    cluster = start_cluster(tiny_loaded, tiny_path, instances=2, weight_dtype="q8_0")
    try:
        want, got, base = _first_logits(single), _first_logits(cluster), _first_logits(plain)
        for w, g, b in zip(want, got, base):
            assert (g - w).abs().max() < 1e-4
            assert (b - w).abs().max() > 1e-3          # the rounding shows in the logits
        toks = [o.token_ids for o in single.generate(PROMPTS, GREEDY)]
        assert [o.token_ids for o in cluster.generate(PROMPTS, GREEDY)] == toks
    finally:
        cluster.close()
        single.close()
        plain.close()
