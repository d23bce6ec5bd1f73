"""Incremental detokenization: output token ids in, text deltas out, one step at a time.

Owns: `IncrementalDetokenizer`, which turns a request's output token stream into text
deltas for streaming. Must not import torch or anything under `loong.worker`, `loong.model`
or `loong.sched`; it needs only an object with `decode(ids, skip_special_tokens=...)`
(a Hugging Face tokenizer or a `tokenizers.Tokenizer`).

Technique (the "prefix window" of vLLM / HF's DecodeStream). Two offsets into the token list:
`prefix_offset` <= `read_offset`. Tokens before `read_offset` have been emitted; the window
`tokens[prefix_offset:read_offset]` is context, decoded to `prefix_text`. Each step decodes
`tokens[prefix_offset:]`; if the text grew and does not end in U+FFFD (the replacement
character that a byte-level decoder prints for an incomplete UTF-8 sequence), the new part
is emitted and the window slides: prefix_offset <- read_offset <- len(tokens). Otherwise
nothing is emitted and the tokens stay pending. So a token that ends inside a multi-byte
character shows nothing until the character is complete, and each step decodes only the
last emitted chunk plus the pending tokens (bounded work; pending tokens accumulate only
while the text keeps ending in U+FFFD). Decoding a window that starts at a clean token
boundary gives the same characters as the full decode from that boundary on, so the
concatenated deltas equal the full decode.

Context: the window starts on the last few prompt tokens (like vLLM) so that decoders which
treat the first token specially (e.g. SentencePiece's leading space) see the output as a
continuation of the prompt. For byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3,
Qwen2) the concatenated deltas equal `tokenizer.decode(output_ids)` exactly; for
SentencePiece ones they equal the text that the output adds after the prompt.
When a request finishes, call `flush()`: it emits what is still pending (e.g. a stream that
ends with an incomplete UTF-8 sequence shows its U+FFFD then, as the full decode does).
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

REPLACEMENT_CHAR = "\ufffd"
PROMPT_CONTEXT_TOKENS = 5   # prompt tokens decoded as context for the first output token


def _decode(tokenizer: Any, ids: Sequence[int], skip_special_tokens: bool) -> str:
    if not ids:
        return ""
    return tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    """Per-request streaming detokenizer. Not thread-safe; one per request."""

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int],
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        # A prompt that ends inside a UTF-8 sequence would let the first output bytes complete
        # a prompt character; decode the output on its own instead.
        if _decode(tokenizer, context, skip_special_tokens).endswith(REPLACEMENT_CHAR):
            context = []
        self._tokens: list[int] = context
        self._num_context = len(context)
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text: str | None = None   # decode of the context window, cached
        self._parts: list[str] = []

    # ------------------------------------------------------------------ queries
    @property
    def output_token_ids(self) -> list[int]:
        return self._tokens[self._num_context:]

    @property
    def num_output_tokens(self) -> int:
        return len(self._tokens) - self._num_context

    @property
    def num_pending_tokens(self) -> int:
        """Tokens fed but not yet reflected in the emitted text."""
        return len(self._tokens) - self._read_offset

    @property
    def output_text(self) -> str:
        """The concatenation of every delta returned so far."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    # ------------------------------------------------------------------ stepping
    def step(self, new_token_ids: Iterable[int] | int) -> str:
        """Feed this step's new token id(s); return the text they complete (maybe "")."""
        if isinstance(new_token_ids, int):
            self._tokens.append(new_token_ids)
        else:
            self._tokens.extend(new_token_ids)
        if len(self._tokens) == self._read_offset:
            return ""
        return self._advance(force=False)

    def flush(self) -> str:
        """Emit everything still pending, even a trailing U+FFFD (call once at finish)."""
        if len(self._tokens) == self._read_offset:
            return ""
        return self._advance(force=True)

    def _advance(self, force: bool) -> str:
        tokens, skip = self._tokens, self.skip_special_tokens
        if self._prefix_text is None:
            self._prefix_text = _decode(
                self.tokenizer, tokens[self._prefix_offset:self._read_offset], skip)
        prefix_text = self._prefix_text
        new_text = _decode(self.tokenizer, tokens[self._prefix_offset:], skip)
        if not force and (len(new_text) <= len(prefix_text)
                          or new_text.endswith(REPLACEMENT_CHAR)):
            return ""   # nothing new yet, or the last character is still incomplete
        delta = new_text[len(prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(tokens)
        self._prefix_text = None
        if delta:
            self._parts.append(delta)
        return delta
