"""SparseGPT: one-shot pruning with OBS weight reconstruction and lazy block updates, optionally
quantizing the surviving weights in the same sweep.

Source: Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot", Algorithm 1 (adaptive mask selection per block of B_s columns by the OBS saliency
w^2 / [H^-1]_jj^2; Eq. 3 update) and Sec. 3.5 (joint sparsification and quantization). Reference:
github.com/IST-DASLab/sparsegpt `sparsegpt.py` (`SparseGPT.fasterprune`). Pure tensor maths on
whatever device the tensors are on; the Hessian H = X X^T (any positive scale) comes from the caller.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from raycompress.algorithms.obs import HessianNotPositiveDefinite, OBSFactor, columns_from, obs_factor_, obs_sweep_
from raycompress.algorithms.quant import QuantSpec, qparams, quantize_column

__all__ = ["HessianNotPositiveDefinite", "SparseGPTResult", "sparsegpt_prune"]


@dataclass
class SparseGPTResult:
    """weight: (d_out, d_in) pruned (and, with quant, dequantized) weight in the input's dtype;
    mask: (d_out, d_in) bool, True = pruned; damping: λ used; loss: OBS error tr(D H_λ D^T);
    scale / zero: (d_out, n_groups) float32 quantization grid, None without quant."""

    weight: torch.Tensor
    mask: torch.Tensor
    damping: float
    loss: float
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None


class _PruneRounder:
    """Rounding = zero the masked weights (then quantize the rest, if a QuantSpec is given)."""

    def __init__(self, w: torch.Tensor, sparsity: float, n_m, quant: QuantSpec | None) -> None:
        d_out, d_in = w.shape
        self.sparsity, self.n_m, self.quant = sparsity, n_m, quant
        self.mask = torch.zeros(d_out, d_in, dtype=torch.bool, device=w.device)
        self.g = (quant.group_size or d_in) if quant else d_in
        n_groups = d_in // self.g if quant else 0
        self.scale = torch.zeros(d_out, n_groups, device=w.device)
        self.zero = torch.zeros(d_out, n_groups, device=w.device)

    def begin_block(self, b0, b1, w1, u1, rest):
        self.b0 = b0
        if self.n_m is None:  # adaptive mask selection over the whole block (all rows)
            score = w1**2 / torch.diagonal(u1).unsqueeze(0) ** 2  # (d_out, B)
            k = int(score.numel() * self.sparsity)
            if k > 0:
                idx = torch.topk(score.flatten(), k, largest=False, sorted=False).indices
                block = torch.zeros_like(score, dtype=torch.bool)
                block.view(-1)[idx] = True
                self.mask[:, b0:b1] = block
        self._rest = rest

    def round(self, j, col, w1, jj, u1):
        if self.n_m is not None and j % self.n_m[1] == 0:
            n, m = self.n_m
            s = w1[:, jj : jj + m] ** 2 / torch.diagonal(u1)[jj : jj + m].unsqueeze(0) ** 2  # (d_out, m)
            drop = torch.topk(s, m - n, dim=1, largest=False).indices + j
            self.mask.scatter_(1, drop, True)
        q = col.masked_fill(self.mask[:, j], 0.0)
        if self.quant is None:
            return q
        grp = j // self.g
        if j % self.g == 0:  # group parameters from the current (error-compensated, masked) weights
            cols = columns_from(w1, jj, self._rest, self.g)
            cols = cols.masked_fill(self.mask[:, j : j + cols.shape[1]], 0.0)
            self.scale[:, grp], self.zero[:, grp] = qparams(cols, self.quant)
        return quantize_column(q, self.scale, self.zero, grp, self.quant)


def _check(w: torch.Tensor, d_h: int, n_m, block_size: int, quant: QuantSpec | None) -> None:
    d_in = w.shape[1]
    if d_h != d_in:
        raise ValueError(f"H must be ({d_in}, {d_in}) for W {tuple(w.shape)}, got ({d_h}, {d_h})")
    if n_m is not None and (d_in % n_m[1] or block_size % n_m[1]):
        raise ValueError(f"N:M needs d_in={d_in} and block_size={block_size} divisible by M={n_m[1]}")
    if quant is not None and quant.group_size and (d_in % quant.group_size or block_size % quant.group_size):
        raise ValueError(f"group size {quant.group_size} must divide d_in={d_in} and block_size={block_size}")


def sparsegpt_prune(
    w: torch.Tensor,
    h: torch.Tensor | None,
    sparsity: float,
    n_m: tuple[int, int] | None = None,
    block_size: int = 128,
    damping: float = 0.01,
    quant: QuantSpec | None = None,
    *,
    factor: OBSFactor | None = None,
) -> SparseGPTResult:
    """Prune `w` to `sparsity` (or N:M) and update the surviving weights to minimise ||WX - ŴX||².

    Args:
        w: (d_out, d_in) weight, any float dtype; the sweep runs in float32 on w's device.
        h: (d_in, d_in) Hessian proxy X X^T over the calibration tokens (not modified); ignored
            when `factor` is given.
        sparsity: fraction pruned; the mask is chosen per block of `block_size` columns over all
            rows (the paper's adaptive mask selection), so each block holds that fraction.
        n_m: (N, M) keeps N of every M consecutive columns in each row (ignores `sparsity`).
        block_size: columns per lazy-update block (B in the paper).
        damping: λ as a fraction of mean(diag(H)) (ignored with `factor`).
        quant: also quantize the surviving weights in the same sweep (Sec. 3.5).
        factor: the precomputed `obs_factor_` of H (natural column order), shared by the linears
            that read the same input.
    Returns:
        `SparseGPTResult`; weight in w's dtype.
    Raises:
        ValueError: shapes disagree, or N:M with d_in or block_size not divisible by M, or a
            group size that does not divide d_in and block_size.
        HessianNotPositiveDefinite: as in `obs.inverse_cholesky_`.
    """
    if factor is None:
        _check(w, h.shape[0] if h.shape[0] == h.shape[1] else -1, n_m, block_size, quant)
        factor = obs_factor_(h.to(torch.float32, copy=True), damping)
    _check(w, factor.u.shape[0], n_m, block_size, quant)
    if factor.perm is not None:
        raise ValueError("SparseGPT sweeps columns in natural order: give a factor without act_order")
    W = w.to(torch.float32, copy=True)  # (d_out, d_in) working copy
    W[:, factor.dead] = 0
    rounder = _PruneRounder(W, sparsity, n_m, quant)
    W, loss = obs_sweep_(W, factor.u, block_size, rounder)
    W[rounder.mask] = 0  # exact zeros where pruned
    scale, zero = (rounder.scale, rounder.zero) if quant is not None else (None, None)
    return SparseGPTResult(W.to(w.dtype), rounder.mask, factor.damping, loss, scale, zero)
