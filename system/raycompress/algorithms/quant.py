"""Integer weight quantization primitives: per-channel or per-group scales, symmetric or not.

Conventions follow compressed-tensors (so that our checkpoints pack losslessly): signed integer
range [-2^(b-1), 2^(b-1)-1]; symmetric scale = max|w| / ((2^b - 1) / 2) with zero point 0;
asymmetric scale = (max(w, 0) - min(w, 0)) / (2^b - 1) and zero point
qmin - round(min(w, 0) / scale). Dequantized value = (q - zero) * scale.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    symmetric: bool = True
    group_size: int | None = None  # None = one scale per output channel

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1


def qparams(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of w (d_out, g) -> (d_out,), (d_out,) float32."""
    w = w.float()
    lo = torch.clamp(w.min(dim=1).values, max=0.0)
    hi = torch.clamp(w.max(dim=1).values, min=0.0)
    eps = torch.finfo(torch.float32).eps
    if spec.symmetric:
        scale = torch.maximum(lo.abs(), hi) / ((2**spec.bits - 1) / 2)
        return scale.clamp_min(eps), torch.zeros_like(scale)
    scale = ((hi - lo) / (2**spec.bits - 1)).clamp_min(eps)
    zero = torch.clamp(spec.qmin - torch.round(lo / scale), spec.qmin, spec.qmax)
    return scale, zero


def quantize_int(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes round(w / scale + zero) clamped to the signed range; w (d_out, g), scale/zero (d_out,) or (d_out, 1)."""
    s = scale.reshape(-1, 1) if scale.dim() == 1 else scale
    z = zero.reshape(-1, 1) if zero.dim() == 1 else zero
    return torch.clamp(torch.round(w.float() / s + z), spec.qmin, spec.qmax)


def fake_quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize then dequantize: (q - zero) * scale, same shape as w."""
    s = scale.reshape(-1, 1) if scale.dim() == 1 else scale
    z = zero.reshape(-1, 1) if zero.dim() == 1 else zero
    return (quantize_int(w, s, z, spec) - z) * s


def quantize_column(col: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grp: int, spec: QuantSpec) -> torch.Tensor:
    """`fake_quant` of one column col (d_out,) with group `grp`'s parameters, scale/zero (d_out, n_groups)."""
    return fake_quant(col.unsqueeze(1), scale[:, grp], zero[:, grp], spec).squeeze(1)


def rtn(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest baseline (the GPTQ paper's RTN): each group of `spec.group_size`
    consecutive input columns (all d_in columns when None) gets its own `qparams`.

    Args:
        w: (d_out, d_in) weight, any float dtype.
    Returns:
        (dequantized w (d_out, d_in) float32, scale (d_out, n_groups), zero (d_out, n_groups)),
        n_groups = d_in / group_size; every value is within half a step (scale / 2) of w.
    Raises:
        ValueError: w is not 2-D, or group_size does not divide d_in (no partial last group:
            a checkpoint's group count is d_in / group_size).
    """
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D (d_out, d_in), got shape {tuple(w.shape)}")
    g = spec.group_size or w.shape[1]
    if w.shape[1] % g:
        raise ValueError(f"group size {g} does not divide d_in={w.shape[1]}")
    out, scales, zeros = torch.empty_like(w, dtype=torch.float32), [], []
    for c in range(0, w.shape[1], g):
        s, z = qparams(w[:, c : c + g], spec)
        out[:, c : c + g] = fake_quant(w[:, c : c + g], s, z, spec)
        scales.append(s)
        zeros.append(z)
    return out, torch.stack(scales, 1), torch.stack(zeros, 1)
