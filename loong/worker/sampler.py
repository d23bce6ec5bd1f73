"""Batched sampling: fp32 logits `[B, V]` -> one next token per row (plus logprobs).

Owns: `SamplingBatch` (the per-step, per-row sampling inputs, built with
`SamplingBatch.from_params`), `Sampler` (the batched pipeline), `SamplerOutput` and
`plain_greedy` (whether rows may skip the batch and take the hot path).
Used once per engine step by the instance that computes the new tokens (the master).
Must not import: the scheduler (`loong.sched`), the engine, RPC or model code. Imports
torch, `loong.sampling_params` and `loong.ops` (the native row-wise argmax) only.

Pipeline (row-wise; rows whose knob is "off" pass through each stage bit-exactly; logprobs
are taken before step 1):
  1. penalties, in this order: repetition (HF: for tokens seen in prompt or output, divide
     positive logits, multiply non-positive ones), frequency (`-= f * count_in_output`),
     presence (`-= p * (count_in_output > 0)`);
  2. logprobs, when asked: `log_softmax` of the logits as the model computed them ("raw"
     logprobs, vLLM's default `logprobs_mode`): before penalties, min-tokens masking,
     temperature, top-k, top-p and min-p, so they are finite, do not depend on the sampling
     knobs, and are what an RL trainer's own forward pass computes for the sampled tokens;
  3. min-tokens masking: the row's `masked_token_ids` (EOS / stop ids) are set to -inf;
  4. greedy rows: `argmax` (ties -> lowest id, as torch.argmax);
  5. sampled rows: divide by temperature, top-k, top-p (smallest set of most probable
     tokens whose mass >= p, over the top-k renormalised distribution), min-p (drop tokens
     whose prob < min_p * max_prob); ties with the last kept value are kept. Then Gumbel-max
     `argmax(l + G)`, G i.i.d. standard Gumbel: token i with probability softmax(l)[i].
Randomness: unseeded rows share the sampler's generator (or torch's default one). A seeded
row draws its noise from its own generator only, so its token does not depend on the rest
of the batch or on its position in it. `from_params` seeds that generator from
(seed, number of output tokens so far): sampling is stateless across steps, so a request
keeps its random stream when it moves between masters or is recomputed after preemption.
Reproducible for the same device type (CPU and CUDA generators differ).
Fast path: all rows greedy, no penalties, no masks, no logprobs -> a single argmax.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
from typing import Iterable, Sequence

import torch

from loong import ops
from loong.sampling_params import GREEDY_EPS, SamplingParams

_MASK64 = (1 << 64) - 1
NUM_CANDIDATES = 256   # top-p looks at this many best tokens before falling back to a sort


def mix_seed(seed: int, step: int) -> int:
    """A 63-bit generator seed from (request seed, output position): splitmix64 finaliser."""
    z = (seed + (step + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def make_generator(seed: int, step: int = 0, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator a seeded request uses to sample its output token number `step` (0-based)."""
    g = torch.Generator(device=device)
    g.manual_seed(mix_seed(seed, step))
    return g


@dataclass
class SamplingBatch:
    """Per-row inputs of one sampling call; row i matches logits row i.

    Tensors are 1-D of length B on the logits' device. Knobs that are off hold their neutral
    value; `is_greedy` alone decides which rows take the argmax.
    Token-id lists may be empty for rows whose penalties are off (from_params leaves them empty).
    """

    temperatures: torch.Tensor            # [B] f32
    top_k: torch.Tensor                   # [B] int64, 0 = off
    top_p: torch.Tensor                   # [B] f32, 1.0 = off
    min_p: torch.Tensor                   # [B] f32, 0.0 = off
    repetition_penalties: torch.Tensor    # [B] f32, 1.0 = off
    presence_penalties: torch.Tensor      # [B] f32, 0.0 = off
    frequency_penalties: torch.Tensor     # [B] f32, 0.0 = off
    is_greedy: torch.Tensor               # [B] bool
    prompt_token_ids: list[Sequence[int]]   # for repetition penalty (with output ids)
    output_token_ids: list[Sequence[int]]   # for all three penalties
    masked_token_ids: list[Sequence[int]]   # ids forbidden this step (min_tokens)
    generators: list[torch.Generator | None]  # None -> the sampler's shared generator
    num_logprobs: list[int | None]          # None = no logprobs for the row
    # Batch-level flags (plain bools so the hot path never syncs with the device).
    all_greedy: bool = False
    any_greedy: bool = False
    do_penalties: bool = False
    do_top_k: bool = False
    do_top_p: bool = False
    do_min_p: bool = False
    do_masks: bool = False
    max_num_logprobs: int = -1            # -1: no row wants logprobs
    max_top_k: int = 0                    # largest top_k over sampled rows (0: all off)

    @property
    def batch_size(self) -> int:
        return len(self.generators)

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams],
        *,
        output_token_ids: Sequence[Sequence[int]] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        eos_token_ids: Iterable[int] = (),
        generators: Sequence[torch.Generator | None] | None = None,
        device: torch.device | str = "cpu",
    ) -> "SamplingBatch":
        """Build the batch for one step.

        `output_token_ids[i]`: the tokens row i generated so far (its length is the index of
        the token being sampled: it drives min_tokens and the seeded generator).
        `prompt_token_ids[i]`: needed only for rows with a repetition penalty.
        `eos_token_ids`: masked (with the row's stop_token_ids) while fewer than min_tokens
        tokens exist, unless the row sets ignore_eos (then only stop_token_ids are masked).
        `generators`: override the per-row generators (None entries: shared generator);
        by default seeded rows get `make_generator(seed, len(output_token_ids[i]))`.
        """
        b = len(params)
        outs = list(output_token_ids) if output_token_ids is not None else [()] * b
        prompts = list(prompt_token_ids) if prompt_token_ids is not None else [()] * b
        if len(outs) != b or len(prompts) != b:
            raise ValueError("output_token_ids / prompt_token_ids must have one entry per row")
        eos = tuple(eos_token_ids)
        empty: tuple[int, ...] = ()
        pen_out, pen_prompt, masks, gens, nlp = [], [], [], [], []
        for i, p in enumerate(params):
            rep = p.repetition_penalty != 1.0
            pen_out.append(outs[i] if rep or p.presence_penalty or p.frequency_penalty else empty)
            pen_prompt.append(prompts[i] if rep else empty)
            if len(outs[i]) < p.min_tokens:
                masks.append(tuple(p.stop_token_ids) + (empty if p.ignore_eos else eos))
            else:
                masks.append(empty)
            if generators is not None:
                gens.append(generators[i])
            elif p.seed is not None and not p.is_greedy():
                gens.append(make_generator(p.seed, len(outs[i]), device))
            else:
                gens.append(None)
            nlp.append(p.logprobs)
        greedy = [p.is_greedy() for p in params]
        # Greedy rows ignore temperature / top-k / top-p / min-p: store neutral values.
        top_k = [0 if g else p.top_k for p, g in zip(params, greedy)]
        f32 = dict(dtype=torch.float32, device=device)
        return cls(
            temperatures=torch.tensor([1.0 if g else p.temperature
                                       for p, g in zip(params, greedy)], **f32),
            top_k=torch.tensor(top_k, dtype=torch.int64, device=device),
            top_p=torch.tensor([1.0 if g else p.top_p for p, g in zip(params, greedy)], **f32),
            min_p=torch.tensor([0.0 if g else p.min_p for p, g in zip(params, greedy)], **f32),
            repetition_penalties=torch.tensor([p.repetition_penalty for p in params], **f32),
            presence_penalties=torch.tensor([p.presence_penalty for p in params], **f32),
            frequency_penalties=torch.tensor([p.frequency_penalty for p in params], **f32),
            is_greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            prompt_token_ids=pen_prompt,
            output_token_ids=pen_out,
            masked_token_ids=masks,
            generators=gens,
            num_logprobs=nlp,
            all_greedy=all(greedy),
            any_greedy=any(greedy),
            do_penalties=any(p.has_penalties() for p in params),
            do_top_k=any(k > 0 for k in top_k),
            do_top_p=any(p.top_p < 1.0 and not g for p, g in zip(params, greedy)),
            do_min_p=any(p.min_p > 0.0 and not g for p, g in zip(params, greedy)),
            do_masks=any(len(m) > 0 for m in masks),
            max_num_logprobs=max((n for n in nlp if n is not None), default=-1),
            max_top_k=max(top_k, default=0),
        )

    @classmethod
    def build(cls, params: Sequence[SamplingParams],
              prompt_token_ids: Sequence[Sequence[int]] | None,
              output_token_ids: Sequence[Sequence[int]] | None,
              generators: Sequence[torch.Generator | None] | None,
              eos_token_ids: Iterable[int] = (),
              device: torch.device | str = "cpu") -> "SamplingBatch":
        """Positional form of `from_params`."""
        return cls.from_params(params, output_token_ids=output_token_ids,
                               prompt_token_ids=prompt_token_ids, eos_token_ids=eos_token_ids,
                               generators=generators, device=device)


@dataclass
class SamplerOutput:
    """One entry per row. `logprobs[i]`: logprob of the chosen token (None when row i did not
    ask); `top_logprobs[i]`: the top-N (token id, logprob) pairs, most probable first (None
    when not asked; [] for logprobs=0). The chosen token is in `logprobs`, whether or not it
    is among the top N."""

    token_ids: list[int]
    logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)


def _row_index(rows: list[Sequence[int]], vocab: int, device) -> torch.Tensor | None:
    """Flat indices row*V + id for every id in [0, V) of every row (None when there are
    none). Ids outside the vocabulary name no logit: they are dropped, never written (an
    unchecked id would land in another row's logits or past the end of the buffer)."""
    lengths = [len(r) for r in rows]
    if sum(lengths) == 0:
        return None
    ids = torch.tensor(list(chain.from_iterable(rows)), dtype=torch.int64)   # host side
    row = torch.repeat_interleave(torch.arange(len(rows)) * vocab, torch.tensor(lengths))
    valid = (ids >= 0) & (ids < vocab)
    flat = (row + ids)[valid]
    return flat.to(device) if flat.numel() else None


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition, frequency and presence penalties, in place on `logits` (returned)."""
    b, v = logits.shape
    flat = logits.view(-1)
    seen_idx = _row_index(
        [list(p) + list(o) if len(p) else o
         for p, o in zip(batch.prompt_token_ids, batch.output_token_ids)], v, logits.device)
    if seen_idx is not None:
        seen = torch.zeros(b * v, dtype=torch.bool, device=logits.device)
        seen[seen_idx] = True
        rp = batch.repetition_penalties.unsqueeze(1).expand(b, v).reshape(-1)
        penalised = torch.where(flat > 0, flat / rp, flat * rp)
        flat.copy_(torch.where(seen, penalised, flat))
    out_idx = _row_index(batch.output_token_ids, v, logits.device)
    if out_idx is not None:
        counts = torch.bincount(out_idx, minlength=b * v).view(b, v).to(logits.dtype)
        logits -= batch.frequency_penalties.unsqueeze(1) * counts
        logits -= batch.presence_penalties.unsqueeze(1) * (counts > 0).to(logits.dtype)
    return logits


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None,
                      top_p: torch.Tensor | None, *, max_top_k: int | None = None,
                      num_candidates: int = NUM_CANDIDATES) -> torch.Tensor:
    """Mask (-inf) tokens outside each row's top-k set and then its top-p set.

    top_k: [B] int64, <= 0 means off. top_p: [B] f32, >= 1 means off. top-p acts on the
    distribution renormalised over the top-k set and keeps the smallest set of most probable
    tokens whose mass reaches p (the most probable token is always kept). Both become a
    per-row threshold on the logit value, so tokens tied with the last kept one are kept too
    (as in Hugging Face). Unmasked values are returned bit-exactly.
    Work: a `topk` over `num_candidates` (or the largest k) instead of a full sort; a full
    sort only when some row's top-p set does not fit in the candidates.
    """
    b, v = logits.shape
    neg_inf = torch.tensor(float("-inf"), device=logits.device)
    if top_k is None:
        top_k = torch.zeros(b, dtype=torch.int64, device=logits.device)
    k_on = top_k > 0
    k_eff = torch.where(k_on, top_k.clamp(max=v), torch.full_like(top_k, v))
    if max_top_k is None:
        max_top_k = int(top_k.max()) if b else 0
    if top_p is None:
        m = max(1, min(v, max_top_k))
        vals = logits.topk(m, dim=-1).values                       # sorted, largest first
        thr = vals.gather(1, (k_eff.clamp(max=m) - 1).unsqueeze(1))
        thr = torch.where(k_on.unsqueeze(1), thr, neg_inf)
        return logits.masked_fill(logits < thr, float("-inf"))

    p_on = top_p < 1.0
    m = min(v, max(num_candidates, max_top_k))
    while True:
        if m == v:
            vals = logits.sort(dim=-1, descending=True).values
        else:
            vals = logits.topk(m, dim=-1).values
        rank = torch.arange(m, device=logits.device)
        in_k = rank.unsqueeze(0) < k_eff.unsqueeze(1)
        # Normaliser: over the top-k set when it lies within the candidates, else the row.
        k_inside = (k_on & (k_eff <= m)).unsqueeze(1)
        lse = torch.where(k_inside,
                          vals.masked_fill(~in_k, float("-inf")).logsumexp(-1, keepdim=True),
                          logits.logsumexp(-1, keepdim=True))
        probs = (vals - lse).exp().masked_fill(~in_k, 0.0)
        mass_before = probs.cumsum(dim=-1) - probs                 # mass of better tokens
        keep = in_k & ((mass_before < top_p.unsqueeze(1)) | ~p_on.unsqueeze(1))
        keep[:, 0] = True
        n_keep = keep.sum(dim=-1)                                  # keep is a prefix
        short = p_on & (n_keep == m) & (k_eff > m)                 # set may extend past m
        if m == v or not bool(short.any()):
            break
        m = v
    thr = vals.gather(1, (n_keep - 1).unsqueeze(1))
    thr = torch.where((k_on | p_on).unsqueeze(1), thr, neg_inf)
    return logits.masked_fill(logits < thr, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below min_p * (max probability), per row.

    Done in logit space: p_i < min_p * p_max  <=>  l_i < l_max + log(min_p) (min_p 0: -inf).
    """
    threshold = logits.amax(dim=-1, keepdim=True) + min_p.log().unsqueeze(1)
    return logits.masked_fill(logits < threshold, float("-inf"))


def plain_greedy(params: Sequence[SamplingParams],
                 output_token_ids: Sequence[Sequence[int]]) -> bool:
    """Whether `Sampler.forward` takes its hot path for these rows whatever else the batch
    holds: every row greedy, without penalties or logprobs, past its min_tokens (so nothing
    is masked). Callers may then call `Sampler.greedy` and skip `SamplingBatch.from_params`."""
    return all(p.is_greedy() and p.logprobs is None and not p.has_penalties()
               and len(out) >= p.min_tokens for p, out in zip(params, output_token_ids))


class Sampler:
    """Stateless apart from the shared generator used by unseeded rows."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator   # None: torch's default generator for the device

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        return self.forward(logits, batch)

    def greedy(self, logits: torch.Tensor) -> SamplerOutput:
        """The hot path alone: every row's argmax, no logprobs (for rows where `plain_greedy`
        holds, without building a SamplingBatch)."""
        b = logits.shape[0]
        return SamplerOutput(ops.argmax_rows(logits).tolist(), [None] * b, [None] * b)

    def forward(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != batch.batch_size:
            raise ValueError(
                f"logits must be [B={batch.batch_size}, V], got {tuple(logits.shape)}")
        b = logits.shape[0]
        no_lp: list = [None] * b
        want_lp = batch.max_num_logprobs >= 0
        # Hot path: pure greedy decoding.
        if batch.all_greedy and not (batch.do_penalties or batch.do_masks or want_lp):
            return self.greedy(logits)

        logits = logits.to(torch.float32, copy=True)
        # Raw logprobs: the model's own distribution, before penalties and temperature.
        logprobs = logits.log_softmax(dim=-1) if want_lp else None
        if batch.do_penalties:
            apply_penalties(logits, batch)
        if batch.do_masks:
            idx = _row_index(batch.masked_token_ids, logits.shape[1], logits.device)
            if idx is not None:
                logits.view(-1)[idx] = float("-inf")

        if batch.all_greedy:
            tokens = ops.argmax_rows(logits)
        else:
            tokens = self._sample(logits, batch)
            if batch.any_greedy:
                tokens = torch.where(batch.is_greedy, ops.argmax_rows(logits), tokens)
        token_list = tokens.tolist()
        if logprobs is None:
            return SamplerOutput(token_list, no_lp, list(no_lp))
        return self._gather_logprobs(logprobs, tokens, token_list, batch)

    # ------------------------------------------------------------------ internals
    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        temps = torch.where(batch.is_greedy | (batch.temperatures < GREEDY_EPS),
                            torch.ones_like(batch.temperatures), batch.temperatures)
        logits = logits / temps.unsqueeze(1)
        if batch.do_top_k or batch.do_top_p:
            logits = apply_top_k_top_p(logits, batch.top_k if batch.do_top_k else None,
                                       batch.top_p if batch.do_top_p else None,
                                       max_top_k=batch.max_top_k)
        if batch.do_min_p:
            logits = apply_min_p(logits, batch.min_p)
        # Gumbel-max: argmax(l + G), G = -log(-log U), draws token i with prob softmax(l)_i
        # (the exponential race argmax(p / E) in log space). U is floored at the smallest
        # normal float so that U = 0 gives a large finite E rather than inf.
        u = torch.empty_like(logits)
        u.uniform_(generator=self.generator)
        for i, g in enumerate(batch.generators):   # seeded rows: their own noise only
            if g is not None:
                u[i].uniform_(generator=g)
        gumbel = u.clamp_(min=torch.finfo(torch.float32).tiny).log_().neg_().log_()
        return ops.argmax_rows(logits.sub_(gumbel))

    @staticmethod
    def _gather_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor,
                         token_list: list[int], batch: SamplingBatch) -> SamplerOutput:
        chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
        n_max = batch.max_num_logprobs
        top_vals: list[list[float]] = []
        top_ids: list[list[int]] = []
        if n_max > 0:
            vals, ids = logprobs.topk(min(n_max, logprobs.shape[1]), dim=-1)
            top_vals, top_ids = vals.tolist(), ids.tolist()
        out_lp: list[float | None] = []
        out_top: list[list[tuple[int, float]] | None] = []
        for i, n in enumerate(batch.num_logprobs):
            if n is None:
                out_lp.append(None)
                out_top.append(None)
            else:
                out_lp.append(chosen[i])
                out_top.append(list(zip(top_ids[i][:n], top_vals[i][:n])) if n else [])
        return SamplerOutput(token_list, out_lp, out_top)
