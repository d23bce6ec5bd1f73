"""Text <-> token ids and chat templates (`Tokenizer`).

Owns: building a `tokenizers.Tokenizer` from a Hugging Face `tokenizer.json` (+ its
`tokenizer_config.json`) or from GGUF tokenizer metadata (byte-level BPE "gpt2" and
SentencePiece-style "llama" vocabularies), special-token bookkeeping, and rendering chat
templates with a sandboxed jinja2 environment.
Must not import torch, gguf or transformers: the GGUF loader hands us plain metadata values,
and transformers is only the reference our tests compare against.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

from loong.errors import InvalidRequestError, ModelLoadError

# llama.cpp token types (tokenizer.ggml.token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer split patterns keyed by `tokenizer.ggml.pre` (the regexes the vocabularies
# were trained with; llama.cpp's names). Unknown names fall back to GPT-2's own regex.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {name: _LLAMA3_SPLIT for name in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe",
                                            "dbrx", "falcon3", "pixtral")}
_SPLITS.update({name: _QWEN2_SPLIT for name in ("qwen2", "deepseek-r1-qwen", "megrez")})
# Llama 3's own tokenizer.json looks whole words up before merging; llama.cpp does the same.
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe"}


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _token_text(token: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or {"content": ...}."""
    if isinstance(token, Mapping):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _sentencepiece_merges(tokens: Sequence[str], scores: Sequence[float],
                          skip: set[str]) -> list[tuple[str, str]]:
    """Recover BPE merges from a SentencePiece vocabulary: every split of a token into two
    known pieces is a merge, ranked by the merged token's score (best first; longer left
    piece first on ties; otherwise vocabulary order)."""
    ids = {t: i for i, t in enumerate(tokens)}
    cands: list[tuple[float, int, int, int, int, str, str]] = []
    for tok, score in zip(tokens, scores):
        if tok in skip:
            continue
        local = []
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in ids and right in ids and left not in skip and right not in skip:
                local.append((ids[left], ids[right], left, right))
        local.sort()
        for li, ri, left, right in local:
            cands.append((-float(score), -len(left), -len(right), li, ri, left, right))
    order = sorted(range(len(cands)), key=lambda k: cands[k][:3])  # stable: keeps vocab order
    return [(cands[k][5], cands[k][6]) for k in order]


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (used by some HF templates to mark assistant
    text) renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):  # type: ignore[override]
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ModelLoadError(f"the model's chat template does not parse: {e}") from None


def _check_messages(messages: Any) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidRequestError("messages", f"must be a list of {{'role', 'content'}} objects, "
                                  f"got {type(messages).__name__}")
    if not messages:
        raise InvalidRequestError("messages", "must contain at least one message")
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise InvalidRequestError("messages", f"messages[{i}] must be an object with 'role' "
                                      f"and 'content', got {type(msg).__name__}")
        for key in ("role", "content"):
            if key not in msg:
                raise InvalidRequestError("messages", f"messages[{i}] has no '{key}'")
            if not isinstance(msg[key], str):
                raise InvalidRequestError("messages", f"messages[{i}].{key} must be a string, "
                                          f"got {type(msg[key]).__name__}")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template of one model."""

    def __init__(self, backend: _Backend, *, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None,
                 unk_token: str | None = None, chat_template: str | None = None,
                 add_bos_token: bool | None = None, add_eos_token: bool | None = None) -> None:
        self._backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token, self.unk_token = pad_token, unk_token
        self.chat_template = chat_template
        self.bos_token_id = self.token_to_id(bos_token)
        self.eos_token_id = self.token_to_id(eos_token)
        self.pad_token_id = self.token_to_id(pad_token)
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        if add_bos_token is not None or add_eos_token is not None:
            self._set_post_processor(add_bos_token, add_eos_token)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "Tokenizer":
        """Load `tokenizer.json` (+ optional `tokenizer_config.json`, `chat_template.jinja`)."""
        directory = os.fspath(directory)
        path = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(path):
            raise ModelLoadError(f"no tokenizer.json in {directory!r} (Loong needs the fast "
                                 "tokenizer file next to config.json)")
        try:
            backend = _Backend.from_file(path)
        except Exception as e:  # tokenizers raises a plain Exception on bad JSON
            raise ModelLoadError(f"cannot read {path!r}: {e}") from None
        cfg: dict[str, Any] = {}
        cfg_path = os.path.join(directory, "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                cfg = json.load(f)
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_path = os.path.join(directory, "chat_template.jinja")
        if template is None and os.path.isfile(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read()
        return cls(backend, bos_token=_token_text(cfg.get("bos_token")),
                   eos_token=_token_text(cfg.get("eos_token")),
                   pad_token=_token_text(cfg.get("pad_token")),
                   unk_token=_token_text(cfg.get("unk_token")), chat_template=template,
                   add_bos_token=cfg.get("add_bos_token"), add_eos_token=cfg.get("add_eos_token"))

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> "Tokenizer":
        """Build from GGUF `tokenizer.*` metadata (values already decoded to Python types)."""
        kind = meta.get("tokenizer.ggml.model")
        tokens = list(meta.get("tokenizer.ggml.tokens") or [])
        if not tokens:
            raise ModelLoadError("GGUF file has no tokenizer.ggml.tokens; cannot build a tokenizer")
        types = list(meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
        add_bos = meta.get("tokenizer.ggml.add_bos_token")
        if kind == "gpt2":
            backend, special_ok = cls._byte_level_backend(tokens, merges,
                                                          meta.get("tokenizer.ggml.pre"))
        elif kind == "llama":
            scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
            backend = cls._sentencepiece_backend(tokens, types, scores, merges,
                                                 meta.get("tokenizer.ggml.add_space_prefix", True))
            special_ok = lambda tok: True  # noqa: E731
            add_bos = True if add_bos is None else add_bos  # llama.cpp's default for SPM
        else:
            raise ModelLoadError(f"GGUF tokenizer.ggml.model is {kind!r}; Loong supports "
                                 "'gpt2' (byte-level BPE) and 'llama' (SentencePiece)")
        control = [AddedToken(t, special=True, normalized=False)
                   for t, ty in zip(tokens, types) if ty == _CONTROL and special_ok(t)]
        user = [AddedToken(t, special=False, normalized=False)
                for t, ty in zip(tokens, types) if ty == _USER_DEFINED and special_ok(t)]
        backend.add_special_tokens(control)
        if user:
            backend.add_tokens(user)

        def tok(key: str) -> str | None:
            idx = meta.get(f"tokenizer.ggml.{key}")
            return tokens[idx] if isinstance(idx, int) and 0 <= idx < len(tokens) else None
        return cls(backend, bos_token=tok("bos_token_id"), eos_token=tok("eos_token_id"),
                   pad_token=tok("padding_token_id"), unk_token=tok("unknown_token_id"),
                   chat_template=meta.get("tokenizer.chat_template"), add_bos_token=add_bos,
                   add_eos_token=meta.get("tokenizer.ggml.add_eos_token"))

    @staticmethod
    def _byte_level_backend(tokens: list[str], merges: list[tuple], pre: str | None):
        alphabet = byte_alphabet()
        letters = set(alphabet.values())
        vocab: dict[str, int] = {}
        for i, t in enumerate(tokens):
            # A token outside the byte alphabet was stored as raw text: spell its bytes.
            key = t if set(t) <= letters else "".join(alphabet[b] for b in t.encode("utf-8"))
            vocab[key] = i
        backend = _Backend(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _IGNORE_MERGES))
        if pre in _SPLITS:
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        elif pre == "smollm":  # digits one by one, then GPT-2's regex (as SmolLM's tokenizer.json)
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        else:
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        # A control token spelled outside the byte alphabet is a converter mislabel; skip it.
        return backend, lambda tok: set(tok) <= letters

    @staticmethod
    def _sentencepiece_backend(tokens: list[str], types: list[int], scores: list[float],
                               merges: list[tuple], add_space_prefix: bool):
        vocab = {t: i for i, t in enumerate(tokens)}
        if not merges:
            skip = {t for t, ty in zip(tokens, types) if ty in (_UNKNOWN, _CONTROL, _BYTE)}
            merges = _sentencepiece_merges(tokens, scores, skip)
        unk = next((t for t, ty in zip(tokens, types) if ty == _UNKNOWN), None)
        backend = _Backend(models.BPE(vocab=vocab, merges=merges, unk_token=unk,
                                      fuse_unk=True, byte_fallback=True))
        backend.normalizer = None
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first" if add_space_prefix else "never", split=False)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_space_prefix:
            steps.append(decoders.Strip(" ", 1, 0))
        backend.decoder = decoders.Sequence(steps)
        return backend

    def _set_post_processor(self, add_bos: bool | None, add_eos: bool | None) -> None:
        """Make encode(add_special_tokens=True) add BOS/EOS exactly as the config asks
        (None keeps what tokenizer.json's own post-processor does)."""
        probe = self._backend.encode("a", add_special_tokens=True).ids
        plain = self._backend.encode("a", add_special_tokens=False).ids
        has_bos = len(probe) > len(plain) and probe[0] == self.bos_token_id
        has_eos = len(probe) > len(plain) and probe[-1] == self.eos_token_id
        # A flag naming a token the vocabulary lacks (e.g. bos_token null) cannot be honoured.
        want_bos = (has_bos if add_bos is None else bool(add_bos)) and self.bos_token_id is not None
        want_eos = (has_eos if add_eos is None else bool(add_eos)) and self.eos_token_id is not None
        if (want_bos, want_eos) == (has_bos, has_eos):
            return
        bos = [self.bos_token] if want_bos else []
        eos = [self.eos_token] if want_eos else []
        single = [f"{t}:0" for t in bos] + ["$A:0"] + [f"{t}:0" for t in eos]
        pair = single + [f"{t}:1" for t in bos] + ["$B:1"] + [f"{t}:1" for t in eos]
        special = ([(self.bos_token, self.bos_token_id)] if want_bos else []) + \
            ([(self.eos_token, self.eos_token_id)] if want_eos else [])
        self._backend.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=list(dict.fromkeys(special)))

    # ---- encode / decode ----------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of distinct ids (added tokens included); the embedding may be larger."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(i for i, t in self._backend.get_added_tokens_decoder().items() if t.special)

    @property
    def backend(self) -> _Backend:
        return self._backend

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str] | None:
        if isinstance(ids, int):
            return self._backend.id_to_token(ids)
        return [self._backend.id_to_token(int(i)) for i in ids]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise InvalidRequestError("prompt", f"must be a string, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        n = self.vocab_size
        bad = next((i for i in ids if not 0 <= i < n), None)
        if bad is not None:
            raise InvalidRequestError("token_ids", f"id {bad} is outside the vocabulary [0, {n})")
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    # ---- chat ---------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False, **extra: Any) -> str | list[int]:
        """Render `messages` with the model's template (ids when `tokenize`, no extra BOS)."""
        if not self.chat_template:
            raise ModelLoadError("this model has no chat template; send a plain prompt instead "
                                 "of chat messages")
        _check_messages(messages)
        template = _compile_template(self.chat_template)
        try:
            text = template.render(messages=[dict(m) for m in messages],
                                   add_generation_prompt=add_generation_prompt,
                                   bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                   pad_token=self.pad_token or "", unk_token=self.unk_token or "",
                                   **extra)
        except jinja2.exceptions.TemplateError as e:
            raise InvalidRequestError("messages", f"rejected by the chat template: {e}") from None
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # ---- saving -------------------------------------------------------------------------
    def save_json(self, path: str | os.PathLike) -> None:
        """Write the backend as a `tokenizer.json` file."""
        self._backend.save(os.fspath(path))

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write `tokenizer.json` + `tokenizer_config.json` (readable by us and transformers)."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        self.save_json(os.path.join(directory, "tokenizer.json"))
        cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                               "clean_up_tokenization_spaces": False}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token", "chat_template",
                    "add_bos_token", "add_eos_token"):
            if getattr(self, key) is not None:
                cfg[key] = getattr(self, key)
        with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, ensure_ascii=False)
