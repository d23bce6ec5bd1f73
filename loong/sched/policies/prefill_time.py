"""Predicted prefill time with the cost model's coefficients cached per group size.

Owns `PrefillTimes`: T_g(s, q) = A_g + B_g s + C_g q (s: tokens of a batch, q: their
squares), the form of `CostModel.prefill_ms_sums`, with (A, B, C) read once for group sizes
1..N (`coeffs[g]`; index 0 unused), so the elastic planners' inner loops do not call the
cost model. Pure Python: imports only `cost_model` of loong; never imports torch.
"""
from __future__ import annotations

from loong.sched.cost_model import CostModel


class PrefillTimes:
    def __init__(self, cost: CostModel, num_instances: int) -> None:
        self.cost = cost
        self.coeffs = [(0.0, 0.0, 0.0)] + [
            (c.a_ms, c.b_ms_per_token, c.c_ms_per_token2)
            for c in map(cost.prefill_coeffs, range(1, num_instances + 1))]

    def t(self, g: int, s: float, q: float) -> float:
        """Predicted prefill ms on g instances of a batch of s tokens, q squared."""
        if g >= len(self.coeffs):
            return self.cost.prefill_ms_sums(g, s, q)
        a, b, c = self.coeffs[g]
        return a + b * s + c * q

    def coef(self, g: int) -> tuple[float, float, float]:
        """(A, B, C) of `t` for g instances."""
        if g >= len(self.coeffs):
            c = self.cost.prefill_coeffs(g)
            return c.a_ms, c.b_ms_per_token, c.c_ms_per_token2
        return self.coeffs[g]
