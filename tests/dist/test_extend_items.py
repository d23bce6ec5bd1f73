"""Decode items that compute several new tokens (`extend`): the new tokens of a prompt
whose prefix is already held as shards attend to each holder's shard (partial `(out, lse)`
merged with the master's causal part), as one-token decode does. Hand-made plans on a
3-instance gloo cluster of the tiny model; the last new token's logits and the master's
new KV must equal a full causal forward of the whole prompt on one instance."""
from dataclasses import dataclass, field

import pytest
import torch

from loong import SamplingParams
from loong.sched.cluster_plan import (ClusterStepPlan, DecodeGroupPlan, DecodeItem, KeepRange,
                                      PrefillGroupPlan, PrefillItem)
from tests.dist.conftest import build_model, reference_logits, start_cluster

PROMPT = [5 + (11 * j) % 240 for j in range(90)]


@dataclass
class Req:
    params: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0))
    prompt_token_ids: list = field(default_factory=list)
    output_token_ids: list = field(default_factory=list)


@pytest.fixture(scope="module")
def cluster(tiny_loaded, tiny_path):
    llm = start_cluster(tiny_loaded, tiny_path, instances=3, kv_capacity_tokens=128, block_size=4)
    yield llm
    llm.close()


@pytest.mark.parametrize("split,master", [((0, 40, 64), 2), ((0, 40, 64), 1), ((0, 64, 64), 0),
                                          ((0, 0, 0), 2)],
                         ids=["two-peers-new-master", "master-holds-part", "one-holder",
                              "no-prefix"])
def test_extend_equals_full_prefill(cluster, tiny_loaded, split, master):
    ex = cluster.engine.executor
    a, b, c = split                   # prefix tokens [a, b) on 0 and [b, c) on 1; new from c
    rid = f"x-{split}-{master}"
    reqs = {rid: Req(prompt_token_ids=PROMPT)}
    step = 1000
    if c:
        keep = tuple(KeepRange(i, s, e) for i, (s, e) in enumerate(((a, b), (b, c))) if e > s)
        pre = PrefillGroupPlan((0, 1), (PrefillItem(rid, tuple(PROMPT[:c]), keep),))
        ex.execute(ClusterStepPlan(step, prefills=(pre,)), reqs)
        reqs[rid].output_token_ids.append(0)        # the prefill sampled one (unused) token
        step += 1
    shards = tuple((i, e - s) for i, (s, e) in enumerate(((a, b), (b, c))) if e > s)
    if master not in dict(shards):
        shards += ((master, 0),)
    item = DecodeItem(rid, PROMPT[c], c, master, tuple(sorted(shards)), tuple(PROMPT[c + 1:]))
    members = tuple(sorted({master, *dict(shards)}))
    res = ex.execute(ClusterStepPlan(step, decodes=(DecodeGroupPlan(members, (item,)),),
                                     want_logits=True), reqs)
    want, ref_kv = reference_logits(build_model(tiny_loaded), PROMPT)
    torch.testing.assert_close(res.logits[rid], want, atol=2e-5, rtol=1e-5)
    assert res.sampled[rid] == int(want.argmax())
    # The master appended the new tokens' KV after what it held, in position order.
    held = dict(shards)[master]
    kv = ex.inspect(master, "kv", rid)
    for layer, (k, v) in enumerate(ref_kv):
        torch.testing.assert_close(kv[layer, 0, held:], k[c:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(kv[layer, 1, held:], v[c:], atol=1e-5, rtol=1e-5)
    ex.execute(ClusterStepPlan(step + 1, releases=(rid,)), reqs)
    for r in range(3):
        assert ex.inspect(r, "shards")[0] == {}
