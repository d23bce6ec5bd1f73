"""`loong.model.hf_export`: the embedded GGUF written as a Hugging Face directory is the exact
inverse of the HF loader (float32: every weight, the config, BOS/EOS and the tokenizer come
back equal), transformers reads the same directory, and its logits and greedy tokens equal
Loong's `LLM(dtype="float32")` on the GGUF. The bfloat16 export (the CLI's default) holds
the float32 weights rounded to bfloat16."""
import json
import os

import pytest
import torch

from loong import LLM, SamplingParams
from loong.errors import ModelLoadError
from loong.model.hf_export import export_hf, hf_config_dict, main
from loong.model.loader import load_model_files

PROMPTS = ["The capital of France is",
           "def add(a, b):\n    return"]
NEW_TOKENS = 12
TOP = 20


@pytest.fixture(scope="module")
def exported(loaded_default, tmp_path_factory):
    """The embedded model exported in float32 (about 5 s)."""
    return export_hf(loaded_default, tmp_path_factory.mktemp("smollm2_hf"), dtype="float32")


def test_files_written(exported):
    names = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
             "tokenizer_config.json"}
    assert names <= set(os.listdir(exported))
    with open(os.path.join(exported, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["torch_dtype"] == "float32"
    with open(os.path.join(exported, "tokenizer_config.json")) as f:
        tok_cfg = json.load(f)
    assert tok_cfg["chat_template"] and tok_cfg["model_max_length"] == 8192


def test_round_trip_through_loong_hf_loader(loaded_default, exported):
    back = load_model_files(exported)
    assert back.config == loaded_default.config
    assert set(back.weights) == set(loaded_default.weights)
    for name, t in loaded_default.weights.items():
        assert back.weights[name].dtype == torch.float32, name
        assert torch.equal(back.weights[name], t), name
    tok, ref = back.tokenizer, loaded_default.tokenizer
    assert (tok.bos_token_id, tok.eos_token_id, tok.chat_template, tok.all_special_ids) == \
        (ref.bos_token_id, ref.eos_token_id, ref.chat_template, ref.all_special_ids)
    msgs = [{"role": "user", "content": "Hi there"}]
    assert tok.apply_chat_template(msgs, tokenize=True) == ref.apply_chat_template(msgs, tokenize=True)
    for p in PROMPTS:
        assert tok.encode(p) == ref.encode(p)


def test_transformers_logits_and_greedy_match_loong(loaded_default, exported):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(exported)
    ids = [loaded_default.tokenizer.encode(p) for p in PROMPTS]
    assert [hf_tok(p)["input_ids"] for p in PROMPTS] == ids
    llm = LLM(loaded=loaded_default, dtype="float32")
    outs = llm.generate(ids, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0,
                                            ignore_eos=True, logprobs=TOP))
    gen = transformers.GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False,
                                        eos_token_id=None, pad_token_id=0)
    for prompt, out in zip(ids, outs):
        n = len(prompt)
        with torch.no_grad():
            expected = hf.generate(torch.tensor([prompt]), generation_config=gen,
                                   attention_mask=torch.ones(1, n, dtype=torch.long))[0, n:].tolist()
            full = torch.tensor([prompt + list(out.token_ids)])
            ref = torch.log_softmax(hf(full).logits[0].float(), dim=-1)
        assert list(out.token_ids) == expected
        for i, (chosen, top) in enumerate(out.logprobs):
            row = ref[n - 1 + i]
            assert chosen == pytest.approx(row[out.token_ids[i]].item(), abs=2e-3)
            assert top[0][1] == pytest.approx(row.max().item(), abs=2e-3)
            got = torch.tensor([lp for _, lp in top])
            want = row[torch.tensor([t for t, _ in top])]
            torch.testing.assert_close(got, want, atol=2e-3, rtol=0)


def test_bfloat16_cli(loaded_default, tmp_path, capsys):
    assert main(["--out", str(tmp_path / "bf16")]) == 0     # embedded model, bfloat16 default
    assert "bfloat16" in capsys.readouterr().out
    back = load_model_files(tmp_path / "bf16")
    assert back.config == loaded_default.config
    for name, t in loaded_default.weights.items():
        assert back.weights[name].dtype == torch.bfloat16, name
        assert torch.equal(back.weights[name], t.to(torch.bfloat16)), name


def test_unexportable_configs(loaded_default):
    cfg = loaded_default.config
    with pytest.raises(ModelLoadError, match="biases q/k/v/o all or none"):
        hf_config_dict(cfg.replace(attention_bias=True))
    with pytest.raises(ModelLoadError, match="cannot export architecture"):
        hf_config_dict(cfg.replace(architecture="GPT2LMHeadModel"))
    with pytest.raises(ModelLoadError, match="no attention biases"):
        hf_config_dict(cfg.replace(architecture="MistralForCausalLM", attention_bias=True,
                                   o_proj_bias=True))
    qwen = hf_config_dict(cfg.replace(architecture="Qwen2ForCausalLM", attention_bias=True))
    assert qwen["model_type"] == "qwen2" and "attention_bias" not in qwen
    assert qwen["sliding_window"] is None


def test_refuses_directory_with_other_weights(loaded_default, tmp_path):
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="already holds other weights"):
        export_hf(loaded_default, tmp_path)
