"""Weight quantization primitives: integer, FP8 (E4M3) and NVFP4 (FP4 E2M1) grids, with scales per
output channel, per group of input columns, or per tensor.

Source: the arithmetic of compressed-tensors 0.20 (`quantization.utils.helpers.calculate_qparams`,
`generate_gparam`, `lifecycle.forward.fake_quantize`, `quantization.utils.fp4_utils.cast_to_fp4`),
reproduced operation by operation so that our checkpoints pack and unpack losslessly with that
library; NVFP4 is NVIDIA's format (FP4 E2M1 values in groups of 16 with an FP8 E4M3 scale per group
and one FP32 global scale per tensor).

Integer (signed range [-2^(b-1), 2^(b-1) - 1]): symmetric scale = max|w| / ((2^b - 1) / 2), zero
point 0; asymmetric scale = (max(w, 0) - min(w, 0)) / (2^b - 1), zero point
round(clamp(qmin - min(w, 0) / scale, qmin, qmax)); code = clamp(round(w / scale + zero)); value
= (code - zero) * scale. FP8: scale = max|w| / 448, value = fp8(clamp(w / scale, ±448)) * scale.
NVFP4: global scale G = 448 * 6 / max|W| over the whole weight; group scale s = fp8(G * max|w_g| / 6)
(0 becomes 0.125); value = fp4(clamp(w / (s / G), ±6)) * (s / G), fp4 rounding to nearest with ties
to the even E2M1 value.

Scales (and NVFP4's global scale) are computed in `QuantSpec.weight_dtype`, the checkpoint's dtype,
as compressed-tensors does for a weight of that dtype, so that the scale the weight was rounded with
is exactly the one the checkpoint stores; codes and dequantized values are computed in float32.
A scale that comes out 0 (an all-zero group) becomes the scale dtype's eps, as in compressed-tensors;
the zero point of such a group is qmin (compressed-tensors gets NaN there), which dequantizes it to 0.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

FP8_MAX = 448.0  # largest float8_e4m3fn value
FP4_MAX = 6.0  # largest E2M1 value
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # non-negative E2M1 values
_FP8_EPS = 0.125  # compressed-tensors' eps for an FP8 scale that rounds to 0
TYPES = ("int", "fp8", "fp4")


@dataclass(frozen=True)
class QuantSpec:
    """A weight grid.

    bits / symmetric: integer width and symmetry (fp8: 8 and symmetric; fp4: 4 and symmetric).
    group_size: input columns per scale; None = one scale per output channel (or per tensor).
    type: "int", "fp8" (float8_e4m3fn) or "fp4" (NVFP4: E2M1 with FP8 group scales and a global scale).
    tensor: one scale for the whole weight (FP8's TENSOR strategy); needs group_size None.
    weight_dtype: the checkpoint's dtype, in which scales are computed (None = float32).
    """

    bits: int = 4
    symmetric: bool = True
    group_size: int | None = None  # None = one scale per output channel
    type: str = "int"
    tensor: bool = False
    weight_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise ValueError(f"QuantSpec.type must be one of {TYPES}, got {self.type!r}")
        if self.type != "int" and (self.bits != {"fp8": 8, "fp4": 4}[self.type] or not self.symmetric):
            raise ValueError(f"{self.type} is symmetric with bits={ {'fp8': 8, 'fp4': 4}[self.type]}, "
                             f"got bits={self.bits}, symmetric={self.symmetric}")
        if self.type == "fp4" and (self.group_size is None or self.tensor):
            raise ValueError("fp4 (NVFP4) needs a group_size (16) and no per-tensor scale")
        if self.tensor and self.group_size is not None:
            raise ValueError("a per-tensor scale (tensor=True) takes no group_size")

    @property
    def qmin(self) -> float:
        """Smallest code (int) or value of the scaled grid (fp8: -448, fp4: -6)."""
        return {"int": -(1 << (self.bits - 1)), "fp8": -FP8_MAX, "fp4": -FP4_MAX}[self.type]

    @property
    def qmax(self) -> float:
        """Largest code (int) or value of the scaled grid (fp8: 448, fp4: 6)."""
        return {"int": (1 << (self.bits - 1)) - 1, "fp8": FP8_MAX, "fp4": FP4_MAX}[self.type]

    @property
    def scale_dtype(self) -> torch.dtype:
        """The dtype scales are computed in (the checkpoint's weight dtype, float32 when unset)."""
        return self.weight_dtype or torch.float32


@dataclass
class QuantResult:
    """Round-to-nearest output. weight: (d_out, d_in) dequantized, float32; scale / zero: (d_out,
    n_groups) float32 (n_groups = 1 per channel or per tensor; zero is 0 when symmetric);
    global_scale: (1,) float32 for NVFP4, else None. Unpacks as the legacy (weight, scale, zero)."""

    weight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    global_scale: torch.Tensor | None = None

    def __iter__(self):
        return iter((self.weight, self.scale, self.zero))

    def __getitem__(self, i):
        return (self.weight, self.scale, self.zero)[i]


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def global_scale_for(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor | None:
    """NVFP4's FP32 global scale of a whole weight w (d_out, d_in): 448 * 6 / max|w| computed in
    spec.scale_dtype (compressed-tensors `generate_gparam`), as a (1,) float32 tensor; None for
    other types. An all-zero weight gives max|w| = the dtype's smallest normal, an infinite result 1."""
    if spec.type != "fp4":
        return None
    dt = spec.scale_dtype
    amax = torch.maximum(w.min().to(dt).clamp(max=0).abs(), w.max().to(dt).clamp(min=0))
    amax = torch.clamp(amax, min=torch.finfo(dt).tiny)
    g = FP8_MAX * FP4_MAX / amax
    return torch.nan_to_num(g, nan=1.0, posinf=1.0, neginf=1.0).to(torch.float32).reshape(1)


def _round_fp8(x: torch.Tensor) -> torch.Tensor:
    """The nearest float8_e4m3fn value (x clamped to ±448 first), back in x's dtype."""
    return torch.clamp(x, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype)


def round_fp4(x: torch.Tensor) -> torch.Tensor:
    """The nearest E2M1 value of each element of x (|x| <= 6 expected), ties to the even value:
    compressed-tensors `cast_to_fp4` (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 2.5 -> 2, 5 -> 4)."""
    a = x.abs()
    out = torch.zeros_like(a)
    steps = ((a > 0.25, 0.5), (a >= 0.75, 1.0), (a > 1.25, 1.5), (a >= 1.75, 2.0), (a > 2.5, 3.0),
             (a >= 3.5, 4.0), (a > 5.0, 6.0))
    for cond, value in steps:
        out = torch.where(cond, torch.full_like(a, value), out)
    return out * torch.sign(x)


def qparams(w: torch.Tensor, spec: QuantSpec, global_scale: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of a block w (d_out, g) -> (d_out,), (d_out,) float32 (values
    representable in spec.scale_dtype; fp4's are FP8 E4M3 values, to be divided by `global_scale`).
    With spec.tensor the whole block shares one scale. Raises ValueError: fp4 without global_scale."""
    dt = spec.scale_dtype
    lo, hi = w.min(dim=1).values.to(dt), w.max(dim=1).values.to(dt)
    if spec.tensor:
        lo, hi = lo.min().expand_as(lo), hi.max().expand_as(hi)
    lo, hi = torch.clamp(lo, max=0), torch.clamp(hi, min=0)
    if spec.type == "fp4":
        if global_scale is None:
            raise ValueError("fp4 (NVFP4) qparams need the tensor's global scale (global_scale_for)")
        local = torch.maximum(lo.abs(), hi) / FP4_MAX  # compressed-tensors: / (bit_range / 2)
        scale = _round_fp8(global_scale.float() * local.float())
        scale = torch.where(scale == 0, torch.full_like(scale, _FP8_EPS), scale)
        return scale, torch.zeros_like(scale)
    bit_range = torch.tensor(float(spec.qmax - spec.qmin), dtype=dt)
    if spec.symmetric:
        scale = torch.maximum(lo.abs(), hi) / (bit_range / 2)
        zero = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / bit_range
        zero = torch.round(torch.clamp(spec.qmin - lo / scale, spec.qmin, spec.qmax))
        zero = torch.where(scale == 0, torch.full_like(zero, spec.qmin), zero)
    scale = torch.where(scale == 0, torch.full_like(scale, _eps(dt)), scale)
    return scale.float(), zero.float()


def _col(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, 1) if t.dim() == 1 else t


def quantize_int(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes round(w / scale + zero) clamped to the signed range; w (d_out, g), scale/zero (d_out,) or (d_out, 1)."""
    return torch.clamp(torch.round(w.float() / _col(scale) + _col(zero)), spec.qmin, spec.qmax)


def fake_quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec,
               global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize then dequantize w (d_out, g) with per-row scale / zero ((d_out,) or (d_out, 1));
    float32, same shape as w. fp4 divides the scale by `global_scale` first (required).
    Equals compressed-tensors `fake_quantize` for a float32 w (cast to the scale dtype after)."""
    s = _col(scale).float()
    if spec.type == "int":
        z = _col(zero).float()
        return (quantize_int(w, s, z, spec) - z) * s
    if spec.type == "fp8":
        return _round_fp8(w.float() / s) * s
    if global_scale is None:
        raise ValueError("fp4 (NVFP4) needs the tensor's global scale (global_scale_for)")
    s = s / global_scale.float()
    return round_fp4(torch.clamp(w.float() / s, -FP4_MAX, FP4_MAX)) * s


def quantize_column(col: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grp: int, spec: QuantSpec,
                    global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """`fake_quant` of one column col (d_out,) with group `grp`'s parameters, scale/zero (d_out, n_groups)."""
    return fake_quant(col.unsqueeze(1), scale[:, grp], zero[:, grp], spec, global_scale).squeeze(1)


def with_weight_dtype(spec: QuantSpec, dtype: torch.dtype) -> QuantSpec:
    """spec with weight_dtype set to `dtype` when it has none (the solvers' weight dtype)."""
    return spec if spec.weight_dtype is not None else replace(spec, weight_dtype=dtype)


def group_width(spec: QuantSpec, d_in: int) -> int:
    """Columns per scale: group_size, or all d_in (per channel, per tensor).
    Raises ValueError: the group size does not divide d_in (a checkpoint has d_in / g groups)."""
    g = spec.group_size or d_in
    if d_in % g:
        raise ValueError(f"group size {g} does not divide d_in={d_in}")
    return g


def rtn(w: torch.Tensor, spec: QuantSpec) -> QuantResult:
    """Round-to-nearest baseline (the GPTQ paper's RTN): each group of `spec.group_size`
    consecutive input columns (all d_in columns when None) gets its own `qparams`; NVFP4's global
    scale comes from the whole weight. Scales are computed in spec.weight_dtype, or in w's dtype
    when it is unset.

    Args:
        w: (d_out, d_in) weight, any float dtype.
    Returns:
        `QuantResult` (unpacks as (weight, scale, zero)); int values are within half a step
        (scale / 2) of w.
    Raises:
        ValueError: w is not 2-D, or group_size does not divide d_in (no partial last group).
    """
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D (d_out, d_in), got shape {tuple(w.shape)}")
    spec = with_weight_dtype(spec, w.dtype)
    g = group_width(spec, w.shape[1])
    gs = global_scale_for(w, spec)
    out, scales, zeros = torch.empty_like(w, dtype=torch.float32), [], []
    for c in range(0, w.shape[1], g):
        s, z = qparams(w[:, c : c + g], spec, gs)
        out[:, c : c + g] = fake_quant(w[:, c : c + g], s, z, spec, gs)
        scales.append(s)
        zeros.append(z)
    return QuantResult(out, torch.stack(scales, 1), torch.stack(zeros, 1), gs)
