"""GPTQ: accurate post-training weight quantization with second-order error compensation.

Source: Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", Algorithm 1 (column-by-column quantization in blocks, with the OBS
update from the upper Cholesky factor of H^-1 and lazy batch updates). Reference:
github.com/IST-DASLab/gptq `gptq.py` (`GPTQ.fasterquant`). Activation order (quantize columns
by decreasing diag(H)) uses *static* groups: group scales come from the original weight in its
natural column order, so the checkpoint needs no group index (llm-compressor's actorder="static").
Without activation order, group parameters are computed when the sweep reaches each group, from
the error-compensated weights (as the reference does); per-channel parameters come from the
original weight.
"""
from __future__ import annotations

import torch

from raycompress.algorithms.obs import columns_from, obs_sweep
from raycompress.algorithms.quant import QuantSpec, qparams, quantize_column
from raycompress.algorithms.sparsegpt import inverse_cholesky


class _QuantRounder:
    """Rounding = quantize the column on its group's grid (natural-order group of the column)."""

    def __init__(self, spec: QuantSpec, perm: torch.Tensor, g: int, scale, zero, dynamic: bool) -> None:
        self.spec, self.perm, self.g, self.scale, self.zero, self.dynamic = spec, perm, g, scale, zero, dynamic

    def begin_block(self, b0, b1, w1, u1, rest):
        self._rest = rest

    def round(self, j, col, w1, jj, u1):
        grp = int(self.perm[j]) // self.g
        if self.dynamic and j % self.g == 0:  # parameters from the error-compensated group
            self.scale[:, grp], self.zero[:, grp] = qparams(columns_from(w1, jj, self._rest, self.g), self.spec)
        return quantize_column(col, self.scale, self.zero, grp, self.spec)


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    spec: QuantSpec,
    block_size: int = 128,
    damping: float = 0.01,
    act_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Quantize `w` to `spec` minimising ||WX - ŴX||² given H = X X^T.

    Args:
        w: (d_out, d_in) weight.
        h: (d_in, d_in) Hessian proxy.
        spec: bits, symmetry, group size (None = per output channel).
        block_size: columns per lazy-update block.
        damping: λ as a fraction of mean(diag(H)).
        act_order: process columns by decreasing diag(H) (static groups).
    Returns:
        (dequantized weight (d_out, d_in) float32, scale (d_out, n_groups), zero (d_out, n_groups),
        damping used).
    Raises:
        ValueError: shapes disagree, or the group size does not divide d_in (and block_size).
    """
    d_out, d_in = w.shape
    g = spec.group_size or d_in
    if h.shape != (d_in, d_in) or d_in % g or (spec.group_size and not act_order and block_size % g):
        raise ValueError(f"need H ({d_in}, {d_in}) and group size {g} dividing d_in and block_size {block_size}; "
                         f"got H {tuple(h.shape)}")
    W = w.float().clone()
    W[:, torch.diagonal(h) == 0] = 0
    dynamic = spec.group_size is not None and not act_order
    scale = torch.zeros(d_out, d_in // g)
    zero = torch.zeros(d_out, d_in // g)
    if not dynamic:  # static: per-channel, or groups under activation order, from the original weight
        for c in range(0, d_in, g):
            scale[:, c // g], zero[:, c // g] = qparams(W[:, c : c + g], spec)
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else torch.arange(d_in)
    U, used = inverse_cholesky(h[perm][:, perm], damping)
    Q = obs_sweep(W[:, perm], U, block_size, _QuantRounder(spec, perm, g, scale, zero, dynamic))
    return Q[:, torch.argsort(perm)], scale, zero, used
