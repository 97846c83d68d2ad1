"""Calibration statistics per linear input, accumulated batch by batch and summed across workers.

Kinds:
- "hessian": H = sum over tokens of x x^T, (d_in, d_in) — SparseGPT / GPTQ.
- "sqnorm": sum over tokens of x_j^2, (d_in,) — Wanda's ||X_j||_2^2.
Each micro-batch's product is computed in float32 and added to a float64 accumulator: sums of
float32 terms are then exact in practice, so the total does not depend on how the calibration set
is split over workers (1 or K actors give bit-identical statistics).
Both carry the token count, so partial statistics from data-parallel workers simply add.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class InputStats:
    kind: str
    value: torch.Tensor  # (d_in, d_in) for hessian, (d_in,) for sqnorm
    tokens: int = 0

    @classmethod
    def empty(cls, kind: str, d_in: int, dtype: torch.dtype = torch.float64) -> "InputStats":
        if kind == "hessian":
            return cls(kind, torch.zeros(d_in, d_in, dtype=dtype))
        if kind == "sqnorm":
            return cls(kind, torch.zeros(d_in, dtype=dtype))
        raise ValueError(f"unknown statistics kind '{kind}' (hessian, sqnorm)")

    def add_batch(self, x: torch.Tensor) -> None:
        """Accumulate activations x (..., d_in)."""
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, d_in)
        if self.kind == "hessian":
            self.value.add_((x.T @ x).to(self.value.dtype))  # (d_in, d_in)
        else:
            self.value.add_((x * x).sum(0).to(self.value.dtype))  # (d_in,)
        self.tokens += x.shape[0]

    def __add__(self, other: "InputStats") -> "InputStats":
        if other.kind != self.kind:
            raise ValueError(f"cannot add {self.kind} and {other.kind} statistics")
        return InputStats(self.kind, self.value + other.value, self.tokens + other.tokens)


def sum_stats(parts: list[InputStats]) -> InputStats:
    """Sum of partial statistics in the given order (callers keep the order fixed)."""
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


def mix_stats(domain: InputStats, general: InputStats, lam: float) -> InputStats:
    """MixCal combination of per-token means: domain/n_d + λ · general/n_g (tokens reported as 1).

    An empty side contributes nothing."""
    def mean(s: InputStats) -> torch.Tensor:
        return s.value / s.tokens if s.tokens else torch.zeros_like(s.value)

    return InputStats(domain.kind, mean(domain) + lam * mean(general), tokens=1)
