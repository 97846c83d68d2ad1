"""SparseGPT: one-shot pruning with OBS weight reconstruction and lazy block updates.

Source: Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot", Algorithm 1 (adaptive mask selection per block of B_s columns, Eq. 3 for the
error-compensating update using rows of the upper Cholesky factor of H^-1). Reference:
github.com/IST-DASLab/sparsegpt `sparsegpt.py` (`SparseGPT.fasterprune`). Written here as a pure
function of tensors: the Hessian H = X X^T (any positive scale) comes from the caller.
"""
from __future__ import annotations

import torch


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
            h_inv = torch.cholesky_inverse(l)
            u, info = torch.linalg.cholesky_ex(h_inv, upper=True)
            if int(info) == 0:
                return u, d
        d = max(d, 1e-6) * growth
    raise HessianNotPositiveDefinite(f"Cholesky failed up to damping {d / growth:g}")


def sparsegpt_prune(
    w: torch.Tensor,
    h: torch.Tensor,
    sparsity: float,
    n_m: tuple[int, int] | None = None,
    block_size: int = 128,
    damping: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Prune `w` to `sparsity` (or N:M) and update the surviving weights to minimise ||WX - ŴX||².

    Args:
        w: (d_out, d_in) weight.
        h: (d_in, d_in) Hessian proxy X X^T accumulated over the calibration tokens.
        sparsity: fraction pruned; the mask is chosen per block of `block_size` columns over all
            rows (the paper's adaptive mask selection), so each block holds that fraction.
        n_m: (N, M) keeps N of every M consecutive columns in each row (ignores `sparsity`).
        block_size: columns per lazy-update block (B in the paper).
        damping: λ as a fraction of mean(diag(H)).
    Returns:
        (pruned weight (d_out, d_in) in w's dtype, mask bool True = pruned, damping used).
    Raises:
        ValueError: shapes disagree; HessianNotPositiveDefinite as in `inverse_cholesky`.
    """
    d_out, d_in = w.shape
    if h.shape != (d_in, d_in):
        raise ValueError(f"H must be ({d_in}, {d_in}) for W {tuple(w.shape)}, got {tuple(h.shape)}")
    if n_m is not None and (d_in % n_m[1] or block_size % n_m[1]):
        raise ValueError(f"N:M needs d_in={d_in} and block_size={block_size} divisible by M={n_m[1]}")
    W = w.float().clone()  # (d_out, d_in)
    dead = torch.diagonal(h) == 0
    W[:, dead] = 0
    U, used = inverse_cholesky(h, damping)  # (d_in, d_in), U^T U = H^-1
    mask = torch.zeros_like(W, dtype=torch.bool)
    for b0 in range(0, d_in, block_size):
        b1 = min(b0 + block_size, d_in)
        W1 = W[:, b0:b1].clone()  # (d_out, B)
        U1 = U[b0:b1, b0:b1]  # (B, B)
        E1 = torch.zeros_like(W1)  # scaled errors (d_out, B)
        M1 = _block_mask(W1, torch.diagonal(U1), sparsity) if n_m is None else torch.zeros_like(W1, dtype=torch.bool)
        for j in range(b1 - b0):
            if n_m is not None and j % n_m[1] == 0:
                n, m = n_m
                s = W1[:, j : j + m] ** 2 / torch.diagonal(U1)[j : j + m].unsqueeze(0) ** 2  # (d_out, m)
                drop = torch.topk(s, m - n, dim=1, largest=False).indices + j
                M1.scatter_(1, drop, True)
            col = W1[:, j]  # (d_out,)
            q = col.masked_fill(M1[:, j], 0.0)
            err = (col - q) / U1[j, j]  # (d_out,)
            W1[:, j:] -= err.unsqueeze(1) * U1[j, j:].unsqueeze(0)  # OBS update inside the block
            W1[:, j] = q
            E1[:, j] = err
        W[:, b0:b1] = W1
        mask[:, b0:b1] = M1
        W[:, b1:] -= E1 @ U[b0:b1, b1:]  # lazy update of all later columns
    W[mask] = 0  # exact zeros where pruned
    return W.to(w.dtype), mask, used


def _block_mask(w1: torch.Tensor, u_diag: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Adaptive mask for one block: prune the lowest w²/[H^-1]_jj² (OBS saliency) of the block."""
    score = w1**2 / u_diag.unsqueeze(0) ** 2  # (d_out, B)
    k = int(score.numel() * sparsity)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        idx = torch.topk(score.flatten(), k, largest=False, sorted=False).indices
        mask.view(-1)[idx] = True
    return mask
