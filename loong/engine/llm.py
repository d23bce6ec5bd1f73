"""LLM: the offline Python API (`LLM(...).generate`, `.chat`).

Owns: argument handling for batches (one params object or one per prompt), running the
engine loop to completion with a progress bar, and returning outputs in prompt order.
All prompts are validated before any is queued, so a bad one loses nothing.
"""
from __future__ import annotations

import sys
import time
from typing import Iterator, Sequence

from loong.config import EngineConfig
from loong.engine.input_processor import check_messages, render_chat
from loong.engine.llm_engine import LLMEngine
from loong.engine.outputs import RequestOutput
from loong.errors import InvalidRequestError
from loong.sampling_params import SamplingParams


class ProgressBar:
    """A one-line progress bar on stderr (finished requests, output tokens/s)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.done = self.tokens = 0
        self.start = time.perf_counter()
        self._last = 0.0

    def update(self, finished: int, tokens: int) -> None:
        self.done += finished
        self.tokens += tokens
        now = time.perf_counter()
        if self.enabled and (now - self._last > 0.2 or self.done == self.total):
            self._last = now
            width = 30
            fill = int(width * self.done / max(self.total, 1))
            rate = self.tokens / max(now - self.start, 1e-9)
            sys.stderr.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} "
                             f"requests, {rate:.1f} tok/s")
            if self.done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


class LLM:
    """Offline generation on one instance in this process, or on a cluster of instance
    processes (the same engine: a single instance is a cluster of one).

    `LLM()` loads the embedded SmolLM2-135M-Instruct. Keyword arguments are the fields of
    `loong.config.EngineConfig` (dtype, device, kv_capacity_tokens, block_size, ...).
    `LLM(instances=N, kv_capacity_tokens=T)` starts N instance processes with T tokens of KV
    each and runs the ESP data plane (ring prefill, multi-master decode); call `close()` or
    use `with LLM(...) as llm:` to stop them.
    """

    def __init__(self, model: str | None = None, *, loaded=None, **kwargs) -> None:
        """`loaded`: a `LoadedModel` already in memory (reuses its weights; `model` is then ignored)."""
        unknown = set(kwargs) - set(EngineConfig.__dataclass_fields__)
        if unknown:
            raise InvalidRequestError(sorted(unknown)[0], f"unknown LLM option; known: "
                                      f"{sorted(EngineConfig.__dataclass_fields__)}")
        self.config = EngineConfig(model=model, **kwargs)
        self.engine = LLMEngine(self.config, loaded)
        self.tokenizer = self.engine.tokenizer

    def close(self) -> None:
        """Stop the instance processes (clusters); the LLM cannot generate afterwards."""
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update_weights(self, weights) -> int:
        """Replace weights in place on every instance: a state dict, (Hugging Face name,
        tensor) pairs (e.g. `model.named_parameters()` of a transformers Llama), or the path
        of a safetensors file or checkpoint directory; any subset of the weights. Checked
        first (an unknown name or a wrong shape raises naming it, and nothing changes); the
        prefix cache is dropped. Returns the new weight version, which every output reports
        (`RequestOutput.weight_version_start` / `weight_version`)."""
        return self.engine.update_weights(weights)

    def init_weight_update_group(self, master_address: str, master_port: int,
                                 world_size: int, rank_offset: int = 1,
                                 timeout_s: float = 300.0) -> None:
        """Join every instance to a trainer's torch.distributed weight-update group (the
        trainer is rank 0 and hosts it: `loong.weight_sync.WeightSender`); blocks until all
        members joined."""
        self.engine.init_weight_update_group(master_address, master_port, world_size,
                                             rank_offset, timeout_s)

    def update_weights_from_distributed(self, names: Sequence[str], dtypes: Sequence[str],
                                        shapes: Sequence[Sequence[int]]) -> int:
        """Receive the weights the trainer broadcasts now (`WeightSender.broadcast`, same
        order) on every instance and load them in place; returns the new weight version."""
        return self.engine.update_weights_from_distributed(list(names), list(dtypes),
                                                           list(shapes))

    @property
    def weight_version(self) -> int:
        """How many weight updates this LLM applied."""
        return self.engine.weight_version

    def generate(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """One output per prompt, in order. A prompt is a string or a list of token ids."""
        prompts, params = self._normalise(prompts, sampling_params)
        return self._run(prompts, params, use_tqdm)

    @staticmethod
    def _normalise(prompts, sampling_params) -> tuple[list, list[SamplingParams]]:
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                        and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise InvalidRequestError("prompts", "is empty")
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise InvalidRequestError("sampling_params", f"{len(sampling_params)} given for "
                                          f"{len(prompts)} prompts")
            return prompts, list(sampling_params)
        return prompts, [sampling_params or SamplingParams()] * len(prompts)

    def _add_all(self, prompts: list, params: list[SamplingParams]) -> list[str]:
        """Queue every prompt, all validated first (a bad one raises before any is queued)."""
        engine = self.engine
        prepared = [engine.prepare(p, sp) for p, sp in zip(prompts, params)]
        for prep in prepared:
            engine.check_fits(prep.ids, prep.params)
        return [engine.add_request(prep) for prep in prepared]

    def as_completed(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
                     sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
                     ) -> Iterator[tuple[int, RequestOutput]]:
        """The iterator form of `generate`: yields (prompt index, completion) for each
        completion as soon as it ends, in the order they end, each exactly once (with
        `SamplingParams(n=...)` each of a prompt's n completions separately, its `index`
        telling which). Generation advances only while the caller asks for the next one, so
        between two it may update weights (`update_weights`: requests in flight go on with the
        new weights, their outputs say so) or stop; leaving the loop early (break, an
        exception, closing the iterator) aborts the requests still in flight."""
        prompts, params = self._normalise(prompts, sampling_params)
        engine = self.engine
        ids = self._add_all(prompts, params)
        order = {rid: i for i, rid in enumerate(ids)}
        want = sum(p.n for p in params)
        seen: set[tuple[str, int]] = set()
        try:
            while len(seen) < want:
                if not engine.has_unfinished():
                    raise RuntimeError("the engine has no request left but some completions "
                                       "never ended (were they aborted elsewhere?)")
                for o in engine.step():
                    for c in (o.outputs or [o]):
                        key = (c.request_id, c.index)
                        if (c.finish_reason is not None and key not in seen
                                and c.request_id in order):
                            seen.add(key)
                            yield order[c.request_id], c
        finally:
            if len(seen) < want:
                for rid in ids:
                    engine.abort(rid)

    def abort_all(self) -> list[RequestOutput]:
        """End every request in flight (finish_reason "abort"); their outputs so far."""
        return self.engine.abort_all()

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             add_generation_prompt: bool = True, use_tqdm: bool = False) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        if not isinstance(messages, list) or not messages:
            raise InvalidRequestError("messages", "must be a non-empty list of {role, content} dicts")
        conversations = messages if isinstance(messages[0], list) else [messages]
        limits = self.config.limits
        ids = [render_chat(self.tokenizer, check_messages(c, limits), add_generation_prompt)
               for c in conversations]
        return self.generate(ids, sampling_params, use_tqdm)

    def _run(self, prompts: list, params: list[SamplingParams], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.engine
        ids = self._add_all(prompts, params)
        order = {rid: i for i, rid in enumerate(ids)}
        results: list[RequestOutput | None] = [None] * len(ids)
        bar = ProgressBar(len(ids), use_tqdm)
        try:
            while any(r is None for r in results):
                updated = engine.step()
                finished = [o for o in updated if o.finished and o.index == 0
                            and o.request_id in order]
                for o in finished:
                    results[order[o.request_id]] = o
                bar.update(len(finished), len(updated))
        except BaseException:
            for rid in ids:
                engine.abort(rid)
            raise
        return results  # type: ignore[return-value]
