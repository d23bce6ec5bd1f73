"""Fixtures of the dist tier: instance processes over gloo on loopback.

Clusters are started once per module and reused: `use_policy` swaps the policy knobs
between tests (only while the cluster is idle). The reference is always the
single-instance computation on the same weights, in fp32.
"""
import dataclasses
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)



@pytest.fixture(scope="session")
def tiny_loaded(tiny_path):
    from loong.model.loader import load_model_files
    return load_model_files(tiny_path)


def start_cluster(loaded, path=None, **kw):
    from loong import LLM
    # Prefix caching off unless asked for: these tests check the data plane's mechanisms
    # (a repeated prompt would otherwise take the cached path).
    args = dict(dtype="float32", data_plane_timeout_s=60.0, instance_threads=1,
                enable_prefix_caching=False)
    args.update(kw)
    return LLM(path, loaded=loaded, **args)


def use_policy(llm, **knobs):
    """Replace the idle cluster's policy with one using these ESPPolicyConfig knobs."""
    from loong.sched.policies.simple_esp import SimpleESPPolicy
    eng = llm.engine
    assert not eng.policy.has_work, "use_policy needs an idle cluster"
    base = dataclasses.replace(eng.policy.cfg, prefill_group_size=None, decode_masters=None,
                               rotate_masters=False)
    eng.policy = SimpleESPPolicy(dataclasses.replace(base, **knobs))
    return eng.policy


def assert_clean(llm):
    """No request left, every block free and accounted for on every instance."""
    eng = llm.engine
    assert not eng.policy.has_work
    ex = eng.executor
    for r in range(ex.num_instances):
        assert ex.inspect(r, "integrity") is None
        shards, free = ex.inspect(r, "shards")
        # No request holds KV; a used block is a cached one (integrity checks that).
        assert shards == {}, (r, shards, free)


def reference_logits(model, ids):
    """Last-token fp32 logits of a full causal forward on one instance (no paging)."""
    from loong.attention.cpu import causal_attention_torch
    scale = model.cfg.head_dim ** -0.5
    kv = []

    def attn(layer, q, k, v):
        kv.append((k.clone(), v.clone()))
        return causal_attention_torch(q, k, v, scale)[0]

    with torch.inference_mode():
        h = model(torch.tensor(ids), torch.arange(len(ids)), attn)
        return model.logits(h[-1:])[0], kv


def build_model(loaded, dtype=torch.float32):
    from loong.model.llama import LlamaModel
    m = LlamaModel(loaded.config, dtype, "cpu")
    m.load_hf_weights(loaded.weights)
    return m.eval()
