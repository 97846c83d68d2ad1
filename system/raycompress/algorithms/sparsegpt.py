"""SparseGPT: one-shot pruning with OBS weight reconstruction and lazy block updates, optionally
quantizing the surviving weights in the same sweep.

Source: Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot", Algorithm 1 (adaptive mask selection per block of B_s columns by the OBS saliency
w^2 / [H^-1]_jj^2; Eq. 3 update) and Sec. 3.5 (joint sparsification and quantization). Reference:
github.com/IST-DASLab/sparsegpt `sparsegpt.py` (`SparseGPT.fasterprune`). Pure tensor maths; the
Hessian H = X X^T (any positive scale) comes from the caller.
"""
from __future__ import annotations

import torch

from raycompress.algorithms.obs import columns_from, obs_sweep
from raycompress.algorithms.quant import QuantSpec, qparams, quantize_column


class HessianNotPositiveDefinite(RuntimeError):
    """Cholesky failed even at the largest damping tried."""


def inverse_cholesky(
    h: torch.Tensor, damping: float, max_tries: int = 6, growth: float = 10.0
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + λI)^-1 with λ = damping * mean(diag(H)), so U^T U = H^-1.

    Columns whose diagonal is 0 (dead inputs) get diag 1 so that H stays invertible. If the
    factorisation fails, damping grows by `growth` and it retries, up to `max_tries` times.

    Args:
        h: (d_in, d_in) symmetric positive semi-definite Hessian proxy X X^T.
    Returns:
        (U (d_in, d_in) float32 upper triangular, damping actually used).
    Raises:
        HessianNotPositiveDefinite: every try failed.
    """
    h = h.float().clone()
    diag = torch.diagonal(h)
    diag[diag == 0] = 1.0
    mean_diag = float(diag.mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    d = damping
    for _ in range(max_tries):
        l, info = torch.linalg.cholesky_ex(h + (d * mean_diag) * eye)
        if int(info) == 0:
            u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(l), upper=True)
            if int(info) == 0:
                return u, d
        d = max(d, 1e-6) * growth
    raise HessianNotPositiveDefinite(f"Cholesky failed up to damping {d / growth:g}")


class _PruneRounder:
    """Rounding = zero the masked weights (then quantize the rest, if a QuantSpec is given)."""

    def __init__(self, d_out: int, d_in: int, sparsity: float, n_m, quant: QuantSpec | None) -> None:
        self.sparsity, self.n_m, self.quant = sparsity, n_m, quant
        self.mask = torch.zeros(d_out, d_in, dtype=torch.bool)
        g = (quant.group_size or d_in) if quant else d_in
        self.g = g
        self.scale = torch.zeros(d_out, d_in // g)
        self.zero = torch.zeros(d_out, d_in // g)

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


def sparsegpt_prune(
    w: torch.Tensor,
    h: torch.Tensor,
    sparsity: float,
    n_m: tuple[int, int] | None = None,
    block_size: int = 128,
    damping: float = 0.01,
    quant: QuantSpec | None = None,
):
    """Prune `w` to `sparsity` (or N:M) and update the surviving weights to minimise ||WX - ŴX||².

    Args:
        w: (d_out, d_in) weight.
        h: (d_in, d_in) Hessian proxy X X^T accumulated over the calibration tokens.
        sparsity: fraction pruned; the mask is chosen per block of `block_size` columns over all
            rows (the paper's adaptive mask selection), so each block holds that fraction.
        n_m: (N, M) keeps N of every M consecutive columns in each row (ignores `sparsity`).
        block_size: columns per lazy-update block (B in the paper).
        damping: λ as a fraction of mean(diag(H)).
        quant: also quantize the surviving weights in the same sweep (Sec. 3.5).
    Returns:
        (pruned weight (d_out, d_in) in w's dtype (float32 when quantized, dequantized values),
        mask bool True = pruned, damping used); with `quant`, also scale and zero point
        (d_out, n_groups) as 4th and 5th items.
    Raises:
        ValueError: shapes disagree, or N:M with d_in or block_size not divisible by M, or a
            group size that does not divide d_in and block_size.
        HessianNotPositiveDefinite: as in `inverse_cholesky`.
    """
    d_out, d_in = w.shape
    if h.shape != (d_in, d_in):
        raise ValueError(f"H must be ({d_in}, {d_in}) for W {tuple(w.shape)}, got {tuple(h.shape)}")
    if n_m is not None and (d_in % n_m[1] or block_size % n_m[1]):
        raise ValueError(f"N:M needs d_in={d_in} and block_size={block_size} divisible by M={n_m[1]}")
    if quant is not None and quant.group_size and (d_in % quant.group_size or block_size % quant.group_size):
        raise ValueError(f"group size {quant.group_size} must divide d_in={d_in} and block_size={block_size}")
    W = w.float().clone()
    W[:, torch.diagonal(h) == 0] = 0
    U, used = inverse_cholesky(h, damping)  # (d_in, d_in), U^T U = H^-1
    rounder = _PruneRounder(d_out, d_in, sparsity, n_m, quant)
    out = obs_sweep(W, U, block_size, rounder)
    out[rounder.mask] = 0  # exact zeros where pruned
    if quant is not None:
        return out, rounder.mask, used, rounder.scale, rounder.zero
    return out.to(w.dtype), rounder.mask, used
