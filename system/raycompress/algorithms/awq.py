"""AWQ: activation-aware per-input-channel weight scaling, searched on a grid.

Source: Lin et al. 2024, "AWQ: Activation-aware Weight Quantization for On-Device LLM Compression
and Acceleration", MLSys, Sec. 3.2 (Eq. 4-5: s = s_X^α, α found by grid search over [0, 1));
reference github.com/mit-han-lab/llm-awq `awq/quantize/auto_scale.py` (`_search_module_scale`).

For ratio r = i / n_grid, i = 0 .. n_grid - 1: s = mean|x|^r, clamped to >= 1e-4 and normalised
by sqrt(max(s) * min(s)) as the reference does; the candidate weights are W' = Q(W diag(s)) diag(s)^-1
(Q the scheme's fake quantization). The scale with the smallest output error wins (the smallest r
on ties, as the reference's strict `<`). At r = 0, s is all ones: plain round-to-nearest.

The error, unlike the reference, is measured per linear from the Hessian: with H = E[x xᵀ] (the
per-token mean over the calibration tokens) and D = W - W',
    loss(r) = Σ_i tr(D_i H D_iᵀ) = Σ_i E_x ||W_i x - W_i' x||²,
which is exact (not an approximation) for the calibration set. llm-awq instead runs the parent
module (the attention block for q/k/v, the MLP for gate/up) and takes the mean squared error of
its output (mean over tokens and output features), which also sees the nonlinearity after the
linears. Ours makes the search a function
of the reduced Hessian only, so it is data-parallel and bit-identical whatever the number of
actors that accumulated H.

Not done here (the reference does them): scales for the pairs v_proj -> o_proj and
up_proj -> down_proj, which fold into the previous linear instead of a norm (out of this
module's scope: the caller decides where scales fold, see `smoothquant.fold_scales`); the weight
clipping search (`auto_clip`). The caller folds the returned scales with `smoothquant.fold_scales`
and transforms the input statistics with `smoothquant.smooth_hessian_` and friends.

Pure tensor maths on h's device.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
import math

import torch

from raycompress.finite import count_nonfinite

SCALE_MIN = 1e-4  # the reference's floor for mean|x|^r


@dataclass
class AWQResult:
    """scales: (d_in,) float32, the best s (fold W diag(s), norm / s); ratio: its r in [0, 1);
    losses: loss(r) per grid point (NaN/Inf kept where the candidate failed); loss: losses at the
    best ratio; loss_unscaled: losses[0], r = 0, i.e. s = 1 (round-to-nearest). Losses are sums
    over the linears of the mean squared output error per calibration token."""

    scales: torch.Tensor
    ratio: float
    losses: list[float]
    loss: float
    loss_unscaled: float


def awq_scales(act_mean: torch.Tensor, ratio: float) -> torch.Tensor:
    """The candidate s for one ratio: act_mean^ratio clamped to >= 1e-4, divided by
    sqrt(max * min); (d_in,) float32. At ratio 0 every entry is exactly 1."""
    s = act_mean.to(torch.float32).pow(ratio).clamp_min(SCALE_MIN)
    return s / (s.max() * s.min()).sqrt()


def awq_loss(
    weights: Sequence[torch.Tensor],
    h: torch.Tensor,
    s: torch.Tensor,
    quantize: Callable[[torch.Tensor], torch.Tensor],
) -> float:
    """Σ_i tr(D_i H D_iᵀ) with D_i = W_i - Q(W_i diag(s)) diag(s)^-1, one linear at a time.

    Args:
        weights: each (d_out_i, d_in), any float dtype; widened to float32 on h's device.
        h: (d_in, d_in) per-token mean Hessian E[x xᵀ]; the trace is taken in float64 if h is
            float64, else in float32.
        s: (d_in,) float32 scales.
        quantize: fake quantization, (d_out, d_in) float32 -> same shape.
    Returns:
        the loss as a Python float (may be NaN/Inf if quantize or H produce them).
    """
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    hh = h if h.dtype == acc else h.to(acc)
    s = s.to(device=h.device, dtype=torch.float32).unsqueeze(0)
    total = torch.zeros((), dtype=acc, device=h.device)
    for w in weights:
        w32 = w.to(device=h.device, dtype=torch.float32)
        d = (w32 - quantize(w32 * s) / s).to(acc)  # (d_out_i, d_in)
        total += ((d @ hh) * d).sum()
        del d
    return float(total)


def _check(weights: Sequence[torch.Tensor], act_mean: torch.Tensor, h: torch.Tensor, n_grid: int) -> None:
    d_in = act_mean.shape[0] if act_mean.dim() == 1 else -1
    if d_in < 0:
        raise ValueError(f"act_mean must be 1-D (d_in,), got {tuple(act_mean.shape)}")
    if h.shape != (d_in, d_in):
        raise ValueError(f"h must have shape ({d_in}, {d_in}), got {tuple(h.shape)}")
    if len(weights) == 0:
        raise ValueError("awq_search: need at least one weight")
    for i, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != d_in:
            raise ValueError(f"weights[{i}] must have shape (d_out, {d_in}), got {tuple(w.shape)}")
    if n_grid < 1:
        raise ValueError(f"n_grid must be >= 1, got {n_grid}")
    if count_nonfinite(act_mean) or bool((act_mean < 0).any()):
        raise ValueError("act_mean must be finite and >= 0 (it is a mean |x|)")


def awq_search(
    weights: Sequence[torch.Tensor],
    act_mean: torch.Tensor,
    h: torch.Tensor,
    quantize: Callable[[torch.Tensor], torch.Tensor],
    n_grid: int = 20,
) -> AWQResult:
    """Grid-search AWQ's per-input-channel scale for the linears that share one input.

    Args:
        weights: the group's weights (e.g. q/k/v, or gate/up), each (d_out_i, d_in), any float
            dtype (not modified).
        act_mean: (d_in,) mean |x| per input channel over the calibration tokens (Σ|x| / tokens).
        h: (d_in, d_in) per-token mean Hessian E[x xᵀ] (H / tokens), float32 or float64.
        quantize: the scheme's fake quantization, (d_out, d_in) float32 -> same shape and dtype.
        n_grid: number of ratios r = i / n_grid, i = 0 .. n_grid - 1 (20 in the reference).
    Returns:
        `AWQResult`; deterministic: the same inputs give the same bits.
    Raises:
        ValueError: a shape mismatch, n_grid < 1, act_mean negative or not finite, or every grid
            point's loss NaN/Inf.
    """
    _check(weights, act_mean, h, n_grid)
    losses: list[float] = []
    best: tuple[float, int] | None = None  # (loss, grid index)
    for i in range(n_grid):
        loss = awq_loss(weights, h, awq_scales(act_mean.to(h.device), i / n_grid), quantize)
        losses.append(loss)
        if math.isfinite(loss) and (best is None or loss < best[0]):
            best = (loss, i)
    if best is None:
        raise ValueError(f"awq_search: the loss is NaN/Inf at every one of the {n_grid} grid points")
    ratio = best[1] / n_grid
    return AWQResult(awq_scales(act_mean.to(h.device), ratio), ratio, losses, best[0], losses[0])
