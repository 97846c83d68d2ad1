"""Calibration statistics per linear input, accumulated micro-batch by micro-batch, reduced across
data-parallel workers to the one worker that solves that input group.

Kinds:
- "hessian": H = sum over tokens of x x^T, (d_in, d_in) — SparseGPT / GPTQ.
- "sqnorm": sum over tokens of x_j^2, (d_in,) — Wanda's ||X_j||_2^2.
- "abssum": sum over tokens of |x_j|, (d_in,) — AWQ's activation magnitude (mean |x_j| = abssum / tokens).
- "absmax": max over tokens of |x_j|, (d_in,) — SmoothQuant's max|X_j|, the observers of static
  activation scales (FP8 input_scale, NVFP4 input_global_scale: max over channels), and a KV
  cache's max |k|, max |v| (d_in = 2). Reduced with max instead of a sum: exact in any order, so
  bit-identical whatever the number of workers and shard sizes.
Each micro-batch's product is computed in float32 on the worker's device and added to an
accumulator of `dtype` (float32 by default, `compress.hessian_dtype`), allocated at the first
micro-batch, not before. Micro-batches are aligned to the calibration set (every shard starts at a
multiple of the micro-batch), so the terms summed do not depend on the number of workers; with a
float64 accumulator the sum of those float32 terms is exact in practice, so 1 or K workers give
bit-identical statistics. With float32 they agree to float32 rounding of the sum.
`out_sq` carries the squared norm of each linear's output sum ||W x||² over the same tokens (the
denominator of the relative reconstruction error). Both carry the token count, so partial
statistics from data-parallel workers simply add.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

KINDS = ("hessian", "sqnorm", "abssum", "absmax")
MAX_KINDS = ("absmax",)  # reduced with max; the others add


@dataclass
class InputStats:
    kind: str
    d_in: int
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"
    value: torch.Tensor | None = None  # (d_in, d_in) for hessian, (d_in,) otherwise; None until the first batch
    tokens: int = 0
    out_sq: dict[str, float] = field(default_factory=dict)  # module -> sum over tokens of ||W x||²

    def __post_init__(self) -> None:
        from raycompress.engine.transfer import unship

        self.value = unship(self.value)
        if self.kind not in KINDS:
            raise ValueError(f"unknown statistics kind '{self.kind}' ({', '.join(KINDS)})")

    @classmethod
    def empty(cls, kind: str, d_in: int, dtype: torch.dtype = torch.float32, device="cpu") -> "InputStats":
        return cls(kind, d_in, dtype, device)

    @property
    def nbytes(self) -> int:
        return 0 if self.value is None else self.value.numel() * self.value.element_size()

    def _buffer(self) -> torch.Tensor:
        if self.value is None:
            shape = (self.d_in, self.d_in) if self.kind == "hessian" else (self.d_in,)
            self.value = torch.zeros(shape, dtype=self.dtype, device=self.device)
        return self.value

    def add_batch(self, x: torch.Tensor) -> None:
        """Accumulate activations x (..., d_in)."""
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, d_in)
        acc = self._buffer()
        if self.kind == "hessian":
            if acc.dtype == torch.float32:
                acc.addmm_(x.T, x)  # (d_in, d_in), no temporary
            else:
                acc.add_((x.T @ x).to(acc.dtype))
        elif self.kind == "sqnorm":
            acc.add_((x * x).sum(0).to(acc.dtype))  # (d_in,)
        elif self.kind == "abssum":
            acc.add_(x.abs().sum(0).to(acc.dtype))  # (d_in,)
        else:
            self.add_max(x.abs().amax(0) if x.shape[0] else torch.zeros_like(acc))
        self.tokens += x.shape[0]

    def add_max(self, m: torch.Tensor) -> None:
        """absmax: fold a (d_in,) tensor of maxima in (elementwise max; NaN propagates)."""
        acc = self._buffer()
        torch.maximum(acc, m.to(acc.device, acc.dtype), out=acc)

    def add_output(self, module: str, sq: float) -> None:
        self.out_sq[module] = self.out_sq.get(module, 0.0) + sq

    def add_(self, other: "InputStats") -> "InputStats":
        """In-place sum (max for `MAX_KINDS`) with a partial of the same kind (moved to this
        accumulator's device)."""
        if other.kind != self.kind:
            raise ValueError(f"cannot add {self.kind} and {other.kind} statistics")
        if other.value is not None and self.kind in MAX_KINDS:
            self.add_max(other.value)
        elif other.value is not None:
            self._buffer().add_(other.value.to(self.value.device, self.value.dtype))
        self.tokens += other.tokens
        for k, v in other.out_sq.items():
            self.add_output(k, v)
        return self

    def __reduce__(self):
        """Pickled with the value as a `Shipped` tensor: zero-copy through Ray's object store."""
        from raycompress.engine.transfer import Shipped

        value = None if self.value is None else Shipped(self.value.to("cpu"))
        return InputStats, (self.kind, self.d_in, self.dtype, "cpu", value, self.tokens, dict(self.out_sq))

    def to(self, device) -> "InputStats":
        value = None if self.value is None else self.value.to(device)
        return InputStats(self.kind, self.d_in, self.dtype, device, value, self.tokens, dict(self.out_sq))



def require_finite(stats: list[InputStats | None]) -> None:
    """Raise ValueError naming the statistic when a reduced statistic holds NaN or Inf (activations
    of the calibration set that overflowed, or NaN-producing inputs, reached this linear)."""
    for st in stats:
        if st is not None and st.value is not None and not bool(torch.isfinite(st.value).all()):
            bad = int((~torch.isfinite(st.value)).sum())
            raise ValueError(f"the {st.kind} activation statistic has {bad} NaN or Inf values over {st.tokens} "
                             "calibration tokens: check the calibration sources named in the select manifest")


def mean_(s: InputStats) -> InputStats:
    """In place: the per-token mean (value / tokens, out_sq / tokens); tokens reported as 1."""
    n = max(1, s.tokens)
    if s.value is not None:
        s.value.div_(n)
    s.out_sq = {k: v / n for k, v in s.out_sq.items()}
    s.tokens = 1
    return s


def mix_stats(domain: InputStats, general: InputStats, lam: float) -> InputStats:
    """MixCal combination of per-token means: domain/n_d + λ · general/n_g (tokens reported as 1),
    computed in the domain statistics' buffer. An empty side contributes nothing."""
    if domain.value is None and general.value is None:
        return InputStats(domain.kind, domain.d_in, domain.dtype, domain.device, None, 1)
    gen = mean_(general)
    out = mean_(domain)
    out._buffer()
    if general.value is not None and general.tokens:
        out.value.add_(gen.value.to(out.value.device, out.value.dtype), alpha=lam)
    for k, v in gen.out_sq.items():
        out.out_sq[k] = out.out_sq.get(k, 0.0) + lam * v
    return out
