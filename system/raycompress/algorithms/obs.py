"""The Optimal Brain Surgeon sweep shared by SparseGPT and GPTQ.

Columns are processed left to right in blocks; each column is replaced by its "rounded" value
(pruned, quantized, or both) and the error is spread over the not-yet-processed columns with the
row of the upper Cholesky factor U of H^-1: W[:, j:] -= (w_j - q_j) / U_jj * U[j, j:]
(Frantar & Alistarh 2022, "Optimal Brain Compression", Eq. 7; lazy block updates from GPTQ,
Sec. 4 "Lazy Batch-Updates"). Callers decide what rounding means.
"""
from __future__ import annotations

from typing import Protocol

import torch


class Rounder(Protocol):
    def begin_block(self, b0: int, b1: int, w1: torch.Tensor, u1: torch.Tensor, rest: torch.Tensor) -> None:
        """Called at each block start with the block's current weights (d_out, B), U block (B, B),
        and the weights right of the block (d_out, d_in - b1), for mask or scale selection."""

    def round(self, j: int, col: torch.Tensor, w1: torch.Tensor, jj: int, u1: torch.Tensor) -> torch.Tensor:
        """The rounded column j (global index; jj inside the block) from its current value col (d_out,)."""


def columns_from(w1: torch.Tensor, jj: int, rest: torch.Tensor, g: int) -> torch.Tensor:
    """The next g columns (d_out, <= g) from block column jj on, as the sweep holds them now: the
    current block w1 (d_out, B) continued by the weights right of it, rest (d_out, d_in - b1)."""
    return torch.cat([w1[:, jj:], rest], 1)[:, :g]


def obs_sweep(w: torch.Tensor, u: torch.Tensor, block_size: int, rounder: Rounder) -> torch.Tensor:
    """Run the sweep on a float32 copy of w (d_out, d_in) with U (d_in, d_in); returns the rounded W."""
    W = w.clone()
    d_in = W.shape[1]
    for b0 in range(0, d_in, block_size):
        b1 = min(b0 + block_size, d_in)
        W1, U1 = W[:, b0:b1].clone(), u[b0:b1, b0:b1]  # (d_out, B), (B, B)
        E1 = torch.zeros_like(W1)  # scaled errors
        rounder.begin_block(b0, b1, W1, U1, W[:, b1:])
        for jj in range(b1 - b0):
            q = rounder.round(b0 + jj, W1[:, jj], W1, jj, U1)
            err = (W1[:, jj] - q) / U1[jj, jj]
            W1[:, jj:] -= err.unsqueeze(1) * U1[jj, jj:].unsqueeze(0)
            W1[:, jj] = q
            E1[:, jj] = err
        W[:, b0:b1] = W1
        W[:, b1:] -= E1 @ u[b0:b1, b1:]  # lazy update of every later column
    return W

