"""OWL: outlier-weighted layer-wise sparsity ratios.

Source: Yin et al. 2024, "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for
Pruning LLMs to High Sparsity", Sec. 3 (layer outlier distribution, LOD: the share of weights
whose Wanda score |W_ij|·||X_j|| exceeds M times the layer's mean score; sparsity
S_l = 1 - (1 - S) - λ-scaled, mean-centred LOD, so that layers with more outliers are pruned
less and the mean sparsity stays S). Reference: github.com/luuyin/OWL `lib/prune_all.py`.
"""
from __future__ import annotations

import torch


def outlier_count(score: torch.Tensor, m: float) -> tuple[int, int]:
    """(entries of `score` above m × its mean, entries) for one weight's Wanda scores."""
    return int((score > m * score.mean()).sum()), score.numel()


def owl_sparsities(ratios: list[float], target: float, lam: float) -> list[float]:
    """Per-layer sparsity from per-layer outlier ratios (LOD).

    LOD is min-max scaled to [0, 2λ], centred, and subtracted from the target, so that
    mean(sparsity) == target and the spread is at most 2λ. Equal ratios give the target everywhere.
    Raises:
        ValueError: a resulting sparsity falls outside [0, 1).
    """
    r = torch.tensor(ratios, dtype=torch.float64)
    span = float(r.max() - r.min())
    scaled = (r - r.min()) / span * (2 * lam) if span > 0 else torch.zeros_like(r)
    keep = scaled - scaled.mean() + (1 - target)  # density per layer
    out = (1 - keep).tolist()
    if any(not 0.0 <= s < 1.0 for s in out):
        raise ValueError(f"OWL gives sparsities outside [0, 1): {out}; lower owl.lam")
    return out
