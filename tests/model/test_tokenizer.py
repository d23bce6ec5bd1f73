"""Our Tokenizer vs transformers' tokenizer for the same GGUF: encode, decode, special tokens
and chat templates; plus tokenizer.json round trips, SentencePiece GGUFs and request errors."""
import json

import numpy as np
import pytest

from loong.errors import InvalidRequestError, ModelLoadError
from loong.model.tokenizer import Tokenizer
from tests.helpers_models import CHATML_TEMPLATE, tiny_byte_tokenizer_metadata

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. It's 3:45pm; we'll see.",
    "def add(a, b):\n    return a + b  # sum\n\n\tprint(add(1, 2))\n",
    "Numbers: 0 7 42 1234567 3.14159 -2e10 1,000,000 and 2024-05-01",
    "Unicode: café naïve Ωμέγα Привет мир こんにちは 你好，世界 안녕하세요",
    "Emoji: 🙂🚀👩‍👩‍👧 ✔︎ and flags 🇫🇷",
    "  leading spaces, trailing spaces   ",
    "tabs\t\tand\nnewlines\n\n\n  mixed \r\n windows",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text<|im_end|>",
    "",
    " ",
    "a" * 300,
    "URLs https://example.com/a?b=c&d=e#f and emails a.b@c.org",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke about 🐍 and 你好."}],
]


@pytest.fixture(scope="module")
def tok(default_model):
    return default_model.tokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tok, hf_gguf_tokenizer, text):
    assert tok.encode(text) == hf_gguf_tokenizer(text)["input_ids"]
    assert tok.encode(text, add_special_tokens=False) == \
        hf_gguf_tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trip_and_matches_transformers(tok, hf_gguf_tokenizer, text):
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == \
            hf_gguf_tokenizer.decode(ids, skip_special_tokens=skip)


def test_special_tokens_match_transformers(tok, hf_gguf_tokenizer):
    hf = hf_gguf_tokenizer
    assert tok.vocab_size == len(hf) == 49152
    assert (tok.bos_token_id, tok.eos_token_id) == (hf.bos_token_id, hf.eos_token_id) == (1, 2)
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tok.all_special_ids == sorted(set(hf.all_special_ids) | set(range(17)))
    ids = [0, 1, 2, 28, 905, 49151]
    assert tok.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    assert tok.convert_ids_to_tokens(1) == "<|im_start|>"
    # "<|im_start|>" stays one token, and skip_special_tokens drops it
    assert tok.encode("<|im_start|>") == [1]
    assert tok.decode([1, 19556, 2]) == "Hello"


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(tok, hf_gguf_tokenizer, conv, gen):
    messages = CONVERSATIONS[conv]
    ours = tok.apply_chat_template(messages, add_generation_prompt=gen)
    ref = hf_gguf_tokenizer.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
    assert ours == ref
    assert ours.startswith("<|im_start|>system\n")
    assert ours.endswith("<|im_start|>assistant\n") == gen
    ids = tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
    assert ids == hf_gguf_tokenizer.encode(ref, add_special_tokens=False)
    assert ids[0] == 1 and ids.count(1) == len(messages) + (conv != 1) + gen


@pytest.mark.parametrize("bad, match", [
    ("hello", "must be a list"),
    ([], "at least one message"),
    (["hi"], r"messages\[0\] must be an object"),
    ([{"content": "x"}], r"messages\[0\] has no 'role'"),
    ([{"role": "user"}], r"messages\[0\] has no 'content'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": 5}],
     r"messages\[1\].content must be a string"),
    ([{"role": None, "content": "a"}], r"messages\[0\].role must be a string"),
])
def test_malformed_messages(tok, bad, match):
    with pytest.raises(InvalidRequestError, match=match) as info:
        tok.apply_chat_template(bad)
    assert info.value.field == "messages"


def test_template_exceptions_and_missing_template():
    meta = tiny_byte_tokenizer_metadata()
    meta["tokenizer.chat_template"] = (
        "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
        "{{ raise_exception('roles must be user/assistant') }}{% endif %}"
        "{{ bos_token + m['role'] + ': ' + m['content'] | trim + eos_token }}{% endfor %}"
        "{{ messages | tojson }}")
    t = Tokenizer.from_gguf_metadata(meta)
    assert t.apply_chat_template([{"role": "user", "content": " é "}]) == \
        '<|im_start|>user: é<|im_end|>[{"role": "user", "content": " é "}]'
    with pytest.raises(InvalidRequestError, match="roles must be user/assistant"):
        t.apply_chat_template([{"role": "system", "content": "x"}])
    meta.pop("tokenizer.chat_template")
    with pytest.raises(ModelLoadError, match="no chat template"):
        Tokenizer.from_gguf_metadata(meta).apply_chat_template([{"role": "user", "content": "x"}])


def test_decode_rejects_out_of_range(tok):
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        tok.decode([5, 49152])


def test_save_pretrained_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    back = Tokenizer.from_pretrained(tmp_path)
    assert (back.bos_token_id, back.eos_token_id, back.chat_template) == \
        (tok.bos_token_id, tok.eos_token_id, tok.chat_template)
    assert back.all_special_ids == tok.all_special_ids
    for text in TEXTS:
        assert back.encode(text) == tok.encode(text)
    # transformers reads what we wrote the same way (tests build HF checkpoints with it)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS[:6]:
        assert hf(text)["input_ids"] == tok.encode(text)
    conv = CONVERSATIONS[1]
    assert hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(conv)


def test_tokenizer_config_add_bos_and_list_template(tmp_path):
    t = Tokenizer.from_gguf_metadata(tiny_byte_tokenizer_metadata())
    t.save_json(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<|im_start|>"}, "eos_token": "<|endoftext|>", "add_bos_token": True,
        "chat_template": [{"name": "tool_use", "template": "T"},
                          {"name": "default", "template": CHATML_TEMPLATE}]}))
    back = Tokenizer.from_pretrained(tmp_path)
    # ids: 3 specials, 256 bytes (byte b -> 3 + b), then merges Ġt=259, he=260, Ġthe=261
    assert back.encode("the") == [1, 3 + ord("t"), 260]
    assert back.encode("the", add_special_tokens=False) == [3 + ord("t"), 260]
    assert back.eos_token_id == 0 and back.chat_template == CHATML_TEMPLATE
    assert back.vocab_size == 262
    assert back.encode(" the") == [1, 261]
    with pytest.raises(ModelLoadError, match="no tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path / "missing")


# ---- SentencePiece-style ("llama") GGUF vocabularies ------------------------------------------

SP_PIECES = ["▁", "t", "h", "e", "a", "c", "o", "l", "▁t", "he", "▁the", "▁c", "at", "▁cat",
             "ll", "▁he", "llo", "▁hello", "▁a", "▁w", "w", "or", "ld", "▁wor", "▁world", "你", "好"]


def _write_sp_gguf(path):
    import gguf

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SP_PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * len(SP_PIECES)
    scores = [0.0] * 259 + [-float(i) for i in range(len(SP_PIECES))]
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((w.add_block_count, 1), (w.add_context_length, 64), (w.add_embedding_length, 8),
                       (w.add_feed_forward_length, 8), (w.add_head_count, 2), (w.add_head_count_kv, 2)):
        add(value)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_sentencepiece_gguf_matches_transformers(tmp_path):
    import gguf

    from loong.model.gguf_loader import read_metadata

    transformers = pytest.importorskip("transformers")
    _write_sp_gguf(tmp_path / "sp.gguf")
    ours = Tokenizer.from_gguf_metadata(read_metadata(gguf.GGUFReader(str(tmp_path / "sp.gguf"))))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="sp.gguf")
    for text in ["the cat", "hello world", " hello  world", "xyz 你好!", "The Cat\n\nhello", "",
                 "<s>the</s>"]:
        ids = ours.encode(text)
        assert ids == ref(text)["input_ids"], text
        assert ids[0] == 1  # llama.cpp adds BOS to SentencePiece vocabularies by default
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert ours.decode(ours.encode("xyz 你好!")) == "xyz 你好!"
