"""GPTQ: accurate post-training weight quantization with second-order error compensation.

Source: Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", Algorithm 1 (column-by-column quantization in blocks, with the OBS
update from the upper Cholesky factor of H^-1 and lazy batch updates). Reference:
github.com/IST-DASLab/gptq `gptq.py` (`GPTQ.fasterquant`). Activation order (quantize columns
by decreasing diag(H)) uses *static* groups: group scales come from the original weight in its
natural column order, so the checkpoint needs no group index (llm-compressor's actorder="static").

Group parameters without activation order follow the reference: at column i with
i % group_size == 0 it fits them with `find_params(W[:, i:i + group_size])` on the outer W, which
the lazy batch update changes only at block ends. A group's scale and zero therefore come from its
weights as they are when its block starts: compensated for the errors of every earlier block, not
for those of the earlier columns of its own block. The two states differ only for a group that
does not start its block (group_size < block_size); group_size must divide block_size, so no
group straddles two blocks. Here the parameters of all groups of a block are fitted when the
block starts, which gives the same values.

Per-channel parameters come from the original weight with the dead inputs' columns zeroed (the
reference fits them before zeroing; the two differ only when an input is always 0). Every
`QuantSpec` type works the same way (each column rounded on its group's grid): a per-tensor FP8
scale is fitted once from that weight, and NVFP4's global scale too, before the sweep (as
llm-compressor's GPTQ modifier does), its group scales then per block as for integer groups.
Scales are computed in spec.weight_dtype, or in w's dtype when it is unset. Pure tensor maths on
whatever device the tensors are on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from raycompress.algorithms.obs import OBSFactor, obs_factor_, obs_sweep_
from raycompress.algorithms.quant import QuantSpec, global_scale_for, qparams, quantize_column, with_weight_dtype


@dataclass
class GPTQResult:
    """weight: (d_out, d_in) dequantized, in the input's dtype; scale / zero: (d_out, n_groups)
    float32 grid; damping: λ used; loss: OBS error tr(D H_λ D^T) of the sweep; global_scale: (1,)
    float32 NVFP4 global scale, None for other types."""

    weight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    damping: float
    loss: float
    global_scale: torch.Tensor | None = None


class _QuantRounder:
    """Rounding = quantize the column on its group's grid (natural-order group of the column).
    `dynamic`: fit the parameters of the groups of each block (natural order; g divides the
    block size) from the block's weights as they are when it starts (see the module docstring)."""

    def __init__(self, spec: QuantSpec, perm: torch.Tensor, g: int, scale, zero, dynamic: bool,
                 global_scale: torch.Tensor | None = None) -> None:
        self.spec, self.perm, self.g, self.scale, self.zero, self.dynamic = spec, perm.tolist(), g, scale, zero, dynamic
        self.global_scale = global_scale

    def begin_block(self, b0, b1, w1, u1, rest):
        if self.dynamic:  # w1 is untouched by this block's sweep yet: the reference's W[:, i:i + g]
            for c in range(0, b1 - b0, self.g):
                grp = (b0 + c) // self.g
                self.scale[:, grp], self.zero[:, grp] = qparams(w1[:, c:c + self.g], self.spec, self.global_scale)

    def round(self, j, col, w1, jj, u1):
        return quantize_column(col, self.scale, self.zero, self.perm[j] // self.g, self.spec, self.global_scale)


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor | None,
    spec: QuantSpec,
    block_size: int = 128,
    damping: float = 0.01,
    act_order: bool = False,
    *,
    factor: OBSFactor | None = None,
) -> GPTQResult:
    """Quantize `w` to `spec` minimising ||WX - ŴX||² given H = X X^T.

    Args:
        w: (d_out, d_in) weight, any float dtype; the sweep runs in float32 on w's device.
        h: (d_in, d_in) Hessian proxy (not modified); ignored when `factor` is given.
        spec: the grid: type (int, fp8, fp4), bits, symmetry, group size (None = per output channel),
            per-tensor scale; scales in spec.weight_dtype, or w's dtype when unset.
        block_size: columns per lazy-update block.
        damping: λ as a fraction of mean(diag(H)) (ignored with `factor`).
        act_order: process columns by decreasing diag(H) (static groups); with `factor`, the
            factor's own `perm` decides.
        factor: the precomputed `obs_factor_` of H, shared by the linears that read the same input.
    Returns:
        `GPTQResult`; weight in w's dtype.
    Raises:
        ValueError: shapes disagree, or the group size does not divide d_in (and block_size).
        HessianNotPositiveDefinite: as in `obs.inverse_cholesky_`.
    """
    d_out, d_in = w.shape
    spec = with_weight_dtype(spec, w.dtype)
    g = spec.group_size or d_in
    d_h = (factor.u if factor is not None else h).shape
    if d_h != (d_in, d_in) or d_in % g or (spec.group_size and not act_order and factor is None and block_size % g):
        raise ValueError(f"need H ({d_in}, {d_in}) and group size {g} dividing d_in and block_size {block_size}; "
                         f"got H {tuple(d_h)}")
    if factor is None:
        factor = obs_factor_(h.to(torch.float32, copy=True), damping, act_order)
    static_order = factor.perm is not None
    if spec.group_size and not static_order and block_size % g:
        raise ValueError(f"group size {g} must divide block_size {block_size}")
    W = w.to(torch.float32, copy=True)  # (d_out, d_in) working copy
    W[:, factor.dead] = 0
    gs = global_scale_for(W, spec)  # NVFP4: once, from the whole weight
    dynamic = spec.group_size is not None and not static_order
    scale = torch.zeros(d_out, d_in // g, device=w.device)
    zero = torch.zeros(d_out, d_in // g, device=w.device)
    if not dynamic:  # static: per-channel, or groups under activation order, from the original weight
        for c in range(0, d_in, g):
            scale[:, c // g], zero[:, c // g] = qparams(W[:, c : c + g], spec, gs)
    perm = factor.perm if static_order else torch.arange(d_in, device=w.device)
    if static_order:
        W = W[:, perm]
    Q, loss = obs_sweep_(W, factor.u, block_size, _QuantRounder(spec, perm, g, scale, zero, dynamic, gs))
    if static_order:
        Q = Q[:, torch.argsort(perm)]
    return GPTQResult(Q.to(w.dtype), scale, zero, factor.damping, loss, gs)
