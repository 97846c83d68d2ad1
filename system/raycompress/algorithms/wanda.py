"""Wanda: prune by |W_ij| * ||X_j||_2, compared within each output row.

Source: Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models",
Eq. (1) and Sec. 3 ("comparison group" = per output); reference github.com/locuslab/wanda
(`lib/prune.py`, `prune_wanda`). `x_sqnorm` is the per-input-feature sum of squared activations
over all calibration tokens, i.e. ||X_j||_2^2 (any positive scale gives the same mask).
"""
from __future__ import annotations

import torch

from raycompress.algorithms.masks import nm_mask, unstructured_mask


def wanda_score(w: torch.Tensor, x_sqnorm: torch.Tensor) -> torch.Tensor:
    """(d_out, d_in) importance |W| * sqrt(x_sqnorm) with x_sqnorm (d_in,) >= 0."""
    if x_sqnorm.shape != (w.shape[1],):
        raise ValueError(f"x_sqnorm must have shape ({w.shape[1]},), got {tuple(x_sqnorm.shape)}")
    return w.abs().float() * x_sqnorm.float().clamp_min(0).sqrt().unsqueeze(0)


def wanda_prune(
    w: torch.Tensor, x_sqnorm: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune `w` (d_out, d_in) by the Wanda score; exact `sparsity` per row, or N:M.

    Returns:
        (pruned weight, mask (d_out, d_in) bool True = pruned).
    Raises:
        ValueError: x_sqnorm shape does not match d_in.
    """
    score = wanda_score(w, x_sqnorm)
    mask = nm_mask(score, *n_m) if n_m else unstructured_mask(score, sparsity, per_row=True)
    return w.masked_fill(mask, 0), mask
