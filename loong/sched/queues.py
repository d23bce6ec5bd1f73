"""Queue disciplines: the order in which waiting requests are offered to placement.

Owns: `QueueDiscipline` (a sort key over waiting requests, kept separate from where the
requests go), its four kinds (FCFS; skip-join MLFQ after FastServe; shortest predicted
job first; longest predicted output first) and `OutputLengthPredictor`, the online
output-length predictor SJF and LTR use, with `prompt_id` (what makes two prompts "the
same" to it).
Policies keep their waiting queue sorted by `key` (stable: ties keep arrival order) and
re-insert preempted requests by the same key.

- FCFS: arrival order; a preempted request goes back to the front.
- Skip-join MLFQ (FastServe, Wu et al. 2023): levels with quanta q, 2q, 4q, ... of
  service (ms); a new request skips straight to the first level whose quantum covers its
  predicted prefill time; a request that comes back (preempted) joins the level its
  service so far has reached. Lower level first, then arrival. Service is predicted with
  the cost model, so a policy needs one to use it.
- SJF: predicted remaining work first: prefill of the tokens still to compute plus the
  predicted output tokens still to come, each decode token costed as one decode step.
- LTR (longest predicted output first, for RL rollouts; StreamRL's ranker, LPT order): the
  requests predicted to generate the most tokens start first, so a batch's long tail starts
  early and overlaps the short ones instead of running alone at the end ("skewness
  bubbles"); a preempted request goes back to the front.
Pure Python: never imports torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from loong.sched.cost_model import CostModel

DISCIPLINES = ("fcfs", "mlfq", "sjf", "ltr")


def prompt_id(prompt_token_ids) -> int:
    """An id of a prompt's content: samples of one prompt (RL draws n per prompt, and sees
    the same prompts again in later steps) share it."""
    return hash(tuple(prompt_token_ids))


@dataclass
class OutputLengthPredictor:
    """Predicts a request's output length, learning online from finished requests: the mean
    output of earlier requests with the same prompt (`prompt_id`: an RL prompt's other
    samples, or the same prompt in an earlier step), else of finished requests in the same
    power-of-two prompt-length bucket, else of all finished requests, else `prior`."""

    prior: float = 256.0
    _sum: dict[int, float] = field(default_factory=dict)
    _count: dict[int, int] = field(default_factory=dict)
    _by_prompt: dict[int, tuple[float, int]] = field(default_factory=dict)

    @staticmethod
    def _bucket(prompt_len: int) -> int:
        return max(0, int(math.log2(max(prompt_len, 1))))

    def observe(self, prompt_len: int, output_len: int, prompt: int | None = None) -> None:
        b = self._bucket(prompt_len)
        self._sum[b] = self._sum.get(b, 0.0) + output_len
        self._count[b] = self._count.get(b, 0) + 1
        if prompt is not None:
            total, n = self._by_prompt.get(prompt, (0.0, 0))
            self._by_prompt[prompt] = (total + output_len, n + 1)

    def predict(self, prompt_len: int, prompt: int | None = None) -> float:
        if prompt is not None and prompt in self._by_prompt:
            total, n = self._by_prompt[prompt]
            return total / n
        b = self._bucket(prompt_len)
        if self._count.get(b):
            return self._sum[b] / self._count[b]
        total = sum(self._count.values())
        return sum(self._sum.values()) / total if total else self.prior


@dataclass
class QueueDiscipline:
    kind: str = "fcfs"
    cost: CostModel | None = None
    mlfq_quantum_ms: float = 50.0      # the first level's quantum
    mlfq_levels: int = 12
    predictor: OutputLengthPredictor = field(default_factory=OutputLengthPredictor)

    def __post_init__(self) -> None:
        if self.kind not in DISCIPLINES:
            raise ValueError(f"queue: {self.kind!r} is not one of {list(DISCIPLINES)}")
        if self.kind in ("mlfq", "sjf") and self.cost is None:
            raise ValueError(f"queue: {self.kind!r} needs a cost model to predict service")

    def prompt_key(self, prompt_token_ids) -> int | None:
        """The `prompt_id` of a new request's prompt where this discipline predicts output
        lengths (sjf, ltr); None otherwise (hashing a long prompt is not free)."""
        return prompt_id(prompt_token_ids) if self.kind in ("sjf", "ltr") else None

    def key(self, seq: int, prompt_len: int, total_len: int, preempted: bool,
            prompt: int | None = None) -> tuple:
        """Sort key of a waiting request: `seq` its arrival order, `total_len` prompt plus
        outputs so far (all to be recomputed), `preempted` it ran before, `prompt` its
        `prompt_id` (for the predictor)."""
        if self.kind == "fcfs":
            return (0 if preempted else 1, seq)
        if self.kind == "ltr":
            left = self.predictor.predict(prompt_len, prompt) - (total_len - prompt_len)
            return (0 if preempted else 1, -left, seq)
        if self.kind == "sjf":
            left = max(1.0, self.predictor.predict(prompt_len, prompt) - (total_len - prompt_len))
            work = self.cost.prefill_ms(1, [total_len]) + left * self.cost.decode_ms(1, total_len)
            return (work, seq)
        # Skip-join MLFQ: service attained so far (outputs produced) decides the level of a
        # request that comes back; a new one joins by its prefill time.
        service = self.cost.prefill_ms(1, [prompt_len])
        if preempted:
            service += (total_len - prompt_len) * self.cost.decode_ms(1, total_len)
        level = 0
        while level < self.mlfq_levels - 1 and service > self.mlfq_quantum_ms * 2 ** level:
            level += 1
        return (level, seq)
