"""Sparsity masks from importance scores: unstructured (per matrix or per row) and N:M.

Convention: a mask is a bool tensor shaped like the weight, True where the weight is *pruned*.
N:M keeps the N largest-scoring weights in each group of M consecutive input columns
(NVIDIA 2:4 sparse tensor cores: "Accelerating Sparse Deep Neural Networks", Mishra et al. 2021).
"""
from __future__ import annotations

import torch


def unstructured_mask(score: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """Prune the `sparsity` fraction of lowest scores.

    Args:
        score: (d_out, d_in) importance, higher = keep.
        sparsity: fraction in [0, 1) pruned, of the whole matrix or of each row.
        per_row: compare within each output row (Wanda) instead of the whole matrix.
    Returns:
        (d_out, d_in) bool, True = pruned; exactly floor(sparsity * count) pruned per group.
    Raises:
        ValueError: sparsity outside [0, 1) or score not 2-D.
    """
    if score.dim() != 2:
        raise ValueError(f"score must be 2-D (d_out, d_in), got shape {tuple(score.shape)}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    rows = score if per_row else score.reshape(1, -1)
    k = int(rows.shape[1] * sparsity)
    mask = torch.zeros_like(rows, dtype=torch.bool)
    if k > 0:
        idx = torch.topk(rows, k, dim=1, largest=False, sorted=False).indices  # (rows, k)
        mask.scatter_(1, idx, True)
    return mask.reshape(score.shape)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M mask: in every group of `m` consecutive columns of a row, keep the `n` highest scores.

    Args:
        score: (d_out, d_in) importance with d_in divisible by m.
    Returns:
        (d_out, d_in) bool, True = pruned; exactly m - n pruned per group.
    Raises:
        ValueError: d_in not divisible by m, or not 0 < n < m.
    """
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
    d_out, d_in = score.shape
    if d_in % m:
        raise ValueError(f"d_in={d_in} is not divisible by M={m}")
    groups = score.reshape(d_out, d_in // m, m)  # (d_out, groups, m)
    idx = torch.topk(groups, m - n, dim=2, largest=False, sorted=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return mask.reshape(d_out, d_in)


def sparsity_of(w: torch.Tensor) -> float:
    """Fraction of exact zeros in `w`."""
    return float((w == 0).sum()) / max(1, w.numel())
