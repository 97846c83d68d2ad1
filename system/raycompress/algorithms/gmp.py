"""Gradual magnitude pruning (GMP): the cubic sparsity schedule and magnitude masks at a target
sparsity, over all given weights (one global threshold) or per tensor.

Source: Zhu & Gupta 2017, "To prune, or not to prune: exploring the efficacy of pruning for model
compression", eq. 1; used for sparse transfer by Kurtic et al. 2022 (oBERT) and Campos et al.
2022 (Sparse*BERT). Mask convention as in `algorithms.masks`: bool shaped like the weight, True =
pruned.
"""
from __future__ import annotations

import torch

from raycompress.algorithms.masks import unstructured_mask


def _check_schedule(s_i: float, s_f: float, t0: int, n: int, dt: int) -> None:
    for name, s in (("initial sparsity s_i", s_i), ("final sparsity s_f", s_f)):
        if not 0.0 <= s < 1.0:
            raise ValueError(f"GMP {name} must be in [0, 1), got {s}")
    if s_i > s_f:
        raise ValueError(f"GMP only increases sparsity: s_i={s_i} > s_f={s_f}")
    if t0 < 0:
        raise ValueError(f"GMP start step t0 must be >= 0, got {t0}")
    if n < 1:
        raise ValueError(f"GMP needs n >= 1 pruning steps, got n={n}")
    if dt < 1:
        raise ValueError(f"GMP pruning interval dt must be >= 1 step, got dt={dt}")


def gmp_sparsity(step: int, s_i: float, s_f: float, t0: int, n: int, dt: int) -> float:
    """Target sparsity at training step `step` under the cubic schedule (Zhu & Gupta 2017, eq. 1):

        s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))**3,  t in {t0, t0 + dt, ..., t0 + n*dt}

    Pruning happens only every `dt` steps, so between pruning steps the value holds at that of the
    last pruning step; before t0 it is s_i, from t0 + n*dt on it is s_f.

    Args:
        step: training step t (0-based optimizer steps).
        s_i, s_f: initial and final sparsity, fractions in [0, 1) with s_i <= s_f.
        t0: first pruning step; n: number of pruning intervals; dt: steps between pruning steps.
    Returns:
        the sparsity fraction in [s_i, s_f], non-decreasing in `step`.
    Raises:
        ValueError: s_i or s_f outside [0, 1), s_i > s_f, t0 < 0, n < 1 or dt < 1.
    """
    _check_schedule(s_i, s_f, t0, n, dt)
    if step < t0:
        return float(s_i)
    last = t0 + ((step - t0) // dt) * dt  # the most recent pruning step
    frac = min(1.0, (last - t0) / (n * dt))
    return float(s_f + (s_i - s_f) * (1.0 - frac) ** 3)


def is_pruning_step(step: int, t0: int, n: int, dt: int) -> bool:
    """True at t0, t0 + dt, ..., t0 + n*dt (n + 1 steps), the steps at which GMP recomputes masks.

    Raises:
        ValueError: t0 < 0, n < 1 or dt < 1.
    """
    _check_schedule(0.0, 0.0, t0, n, dt)
    return t0 <= step <= t0 + n * dt and (step - t0) % dt == 0


def _scores(weights: dict[str, torch.Tensor], prev: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """|W| in float32; entries pruned in `prev` scored -1, below every magnitude, so they stay pruned."""
    out = {}
    for name, w in weights.items():
        if w.dim() != 2:
            raise ValueError(f"GMP weight {name!r} must be 2-D (d_out, d_in), got shape {tuple(w.shape)}")
        score = w.detach().abs().float()
        if prev is not None and name in prev:
            if prev[name].shape != w.shape:
                raise ValueError(f"GMP previous mask for {name!r} has shape {tuple(prev[name].shape)}, "
                                 f"weight has {tuple(w.shape)}")
            score = score.masked_fill(prev[name].to(score.device), -1.0)
        out[name] = score
    return out


def layer_magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float,
                          prev: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Per-tensor magnitude masks: in each weight, the floor(sparsity * numel) lowest |W| pruned.

    Args:
        weights: name -> W (d_out, d_in), any float dtype and device.
        sparsity: fraction in [0, 1) pruned in each tensor.
        prev: optional name -> bool mask (d_out, d_in) of entries already pruned; they are pruned
            first, so masks only grow while the schedule rises.
    Returns:
        name -> bool mask (d_out, d_in) on W's device, True = pruned.
    Raises:
        ValueError: sparsity outside [0, 1), a weight not 2-D, or a `prev` mask of another shape.
    """
    return {name: unstructured_mask(score, sparsity, per_row=False)
            for name, score in _scores(weights, prev).items()}


def global_magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float,
                           prev: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Global magnitude masks: one threshold over all given weights; exactly
    floor(sparsity * total numel) entries pruned in all, unevenly across tensors.

    Memory: one float32 copy of all given weights (callers with huge models pass a subset).

    Args / Raises: as `layer_magnitude_masks`.
    Returns:
        name -> bool mask (d_out, d_in) on W's device, True = pruned.
    """
    scores = _scores(weights, prev)
    if not scores:
        return {}
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    flat = torch.cat([s.reshape(-1).cpu() for s in scores.values()]).reshape(1, -1)  # (1, total)
    mask = unstructured_mask(flat, sparsity, per_row=True).reshape(-1)
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = mask[start:start + s.numel()].reshape(s.shape).to(s.device)
        start += s.numel()
    return out


def magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float, scope: str = "global",
                    prev: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """`global_magnitude_masks` (scope "global") or `layer_magnitude_masks` (scope "layer").

    Raises:
        ValueError: an unknown scope, or as the chosen function.
    """
    if scope == "global":
        return global_magnitude_masks(weights, sparsity, prev)
    if scope == "layer":
        return layer_magnitude_masks(weights, sparsity, prev)
    raise ValueError(f"GMP scope must be 'global' or 'layer', got {scope!r}")


def pruned_count(masks: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(pruned entries, total entries) over all masks."""
    return sum(int(m.sum()) for m in masks.values()), sum(m.numel() for m in masks.values())


def expected_pruned(numels: list[int], sparsity: float, scope: str = "global") -> int:
    """How many entries `magnitude_masks` prunes for tensors of these sizes: floor(s * total)
    globally, sum of floor(s * numel) per layer."""
    if scope == "global":
        return int(sum(numels) * sparsity)
    return sum(int(k * sparsity) for k in numels)


__all__ = ["gmp_sparsity", "is_pruning_step", "layer_magnitude_masks", "global_magnitude_masks",
           "magnitude_masks", "pruned_count", "expected_pruned"]
