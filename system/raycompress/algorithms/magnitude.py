"""Magnitude pruning: drop the smallest |W| (Han et al. 2015, "Learning both Weights and
Connections"; the layer-wise baseline of the Wanda and SparseGPT papers)."""
from __future__ import annotations

import torch

from raycompress.algorithms.masks import nm_mask, unstructured_mask


def magnitude_prune(
    w: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the lowest-|W| weights of the whole matrix (or per N:M group).

    Args:
        w: (d_out, d_in) weight.
        sparsity: fraction pruned (ignored when n_m is given).
        n_m: (N, M) to keep N of every M consecutive input weights.
    Returns:
        (pruned weight (d_out, d_in) same dtype, mask (d_out, d_in) bool True = pruned).
    """
    score = w.abs().float()
    mask = nm_mask(score, *n_m) if n_m else unstructured_mask(score, sparsity, per_row=False)
    return w.masked_fill(mask, 0), mask
