"""SmoothQuant: move quantization difficulty from activations to weights with per-channel scales.

Source: Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
Language Models", Eq. (4): s_j = max|X_j|^α / max|W_j|^(1-α); reference
github.com/mit-han-lab/smoothquant `smoothquant/smooth.py` (`smooth_ln_fcs`). The input x of a
group of linears that read one norm's output becomes x / s, and every one of those linears' weights
W becomes W diag(s), so W x = (W diag(s)) (x / s) exactly; the division by s is folded into the
norm's weight (and bias), so it costs nothing at inference.

After folding, the calibration statistics of the group's input are those of x / s:
`smooth_hessian_`, `smooth_absmax`, `smooth_abssum` transform them without a new calibration pass.
`fold_scales` and these transforms serve AWQ's scales (`algorithms/awq.py`) as well.

Pure tensor maths on whatever device the tensors are on.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from raycompress.finite import count_nonfinite

CLAMP_MIN = 1e-5  # the reference's floor for the weight maxima and for the scales


def _check_weights(weights: Sequence[torch.Tensor], d_in: int, what: str) -> None:
    """ValueError unless `weights` is a non-empty sequence of 2-D (d_out_i, d_in) tensors."""
    if len(weights) == 0:
        raise ValueError(f"{what}: need at least one weight")
    for i, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != d_in:
            raise ValueError(f"{what}: weights[{i}] must have shape (d_out, {d_in}), got {tuple(w.shape)}")


def _check_vector(t: torch.Tensor, d_in: int, name: str) -> None:
    if t.shape != (d_in,):
        raise ValueError(f"{name} must have shape ({d_in},), got {tuple(t.shape)}")


def smooth_scales(act_absmax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel scales s (Eq. 4), computed in float32.

    s_j = max|X_j|^α / (max_i max_rows |W_i[:, j]|)^(1-α): the weight maximum is taken over every
    linear of the group (they share the input, hence one s). As in the reference, the weight
    maxima and then s are clamped to at least 1e-5. A dead channel (activation maximum 0 or weight
    maximum 0 over the whole group) gets s_j = 1: there is nothing to balance.

    Args:
        act_absmax: (d_in,) per-channel max |x| over the calibration tokens, >= 0, any float dtype.
        weights: the group's weights, each (d_out_i, d_in), any float dtype (not modified).
        alpha: migration strength α in [0, 1] (0.5 in the paper for most models).
    Returns:
        (d_in,) float32 scales, all >= 1e-5, on act_absmax's device.
    Raises:
        ValueError: alpha outside [0, 1]; no weights or a weight not (d_out, d_in); act_absmax not
            (d_in,) or negative; a NaN/Inf in act_absmax or in a weight (the message names which).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    d_in = act_absmax.shape[0] if act_absmax.dim() == 1 else -1
    _check_weights(weights, d_in, "smooth_scales")
    _check_vector(act_absmax, d_in, "act_absmax")
    if count_nonfinite(act_absmax):
        raise ValueError("act_absmax has NaN/Inf values")
    for i, w in enumerate(weights):
        if count_nonfinite(w):
            raise ValueError(f"weights[{i}] has NaN/Inf values")
    a = act_absmax.to(torch.float32)
    if bool((a < 0).any()):
        raise ValueError("act_absmax must be >= 0 (it is a max |x|)")
    w_max = torch.zeros_like(a)
    for w in weights:  # |.| and max are exact in any dtype: reduce first, then widen
        w_max = torch.maximum(w_max, w.abs().amax(dim=0).to(device=a.device, dtype=torch.float32))
    dead = (a == 0) | (w_max == 0)
    s = (a.pow(alpha) / w_max.clamp_min(CLAMP_MIN).pow(1.0 - alpha)).clamp_min(CLAMP_MIN)
    return torch.where(dead, torch.ones_like(s), s)


def _check_scales(s: torch.Tensor, d_in: int) -> None:
    _check_vector(s, d_in, "s")
    if count_nonfinite(s) or bool((s <= 0).any()):
        raise ValueError("s must be finite and > 0")


def fold_scales(
    weights: Sequence[torch.Tensor],
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor | None,
    s: torch.Tensor,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """Fold per-input-channel scales into a norm and the linears that read its output.

    W_i' = W_i diag(s) (column j times s_j); norm weight' = weight / s, bias' = bias / s. For a
    norm whose output is normalized(x) * weight + bias (LayerNorm, RMSNorm without the Gemma-style
    `1 + weight`), W_i' norm'(x) = W_i norm(x) up to rounding. Each product is computed in float32
    and cast back to its input's dtype. Pure: the inputs are not modified.

    Args:
        weights: each (d_out_i, d_in), any float dtype.
        norm_weight: (d_in,) the norm's elementwise scale.
        norm_bias: (d_in,) or None.
        s: (d_in,) scales, finite and > 0 (from `smooth_scales` or `awq.awq_search`).
    Returns:
        (new weights in the same order, new norm weight, new norm bias or None).
    Raises:
        ValueError: a shape mismatch (the message names the tensor), or s not finite and > 0.
    """
    d_in = s.shape[0] if s.dim() == 1 else -1
    _check_weights(weights, d_in, "fold_scales")
    _check_scales(s, d_in)
    _check_vector(norm_weight, d_in, "norm_weight")
    if norm_bias is not None:
        _check_vector(norm_bias, d_in, "norm_bias")
    s32 = s.to(torch.float32)
    new_w = [(w.to(torch.float32) * s32.to(w.device).unsqueeze(0)).to(w.dtype) for w in weights]

    def _div(t: torch.Tensor) -> torch.Tensor:
        return (t.to(torch.float32) / s32.to(t.device)).to(t.dtype)

    return new_w, _div(norm_weight), None if norm_bias is None else _div(norm_bias)


def smooth_hessian_(h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """In place H <- diag(1/s) H diag(1/s): the Hessian Σ (x/s)(x/s)ᵀ of the smoothed inputs.

    Args:
        h: (d_in, d_in) Hessian (sum or per-token mean of x xᵀ), float32 or float64; overwritten.
        s: (d_in,) scales, finite and > 0; used in h's dtype.
    Returns:
        h.
    Raises:
        ValueError: h not (d_in, d_in), or s not (d_in,) finite and > 0.
    """
    d_in = s.shape[0] if s.dim() == 1 else -1
    if h.shape != (d_in, d_in):
        raise ValueError(f"h must have shape ({d_in}, {d_in}), got {tuple(h.shape)}")
    _check_scales(s, d_in)
    sh = s.to(device=h.device, dtype=h.dtype)
    return h.div_(sh.unsqueeze(1)).div_(sh.unsqueeze(0))


def _per_channel_div(stat: torch.Tensor, s: torch.Tensor, name: str) -> torch.Tensor:
    d_in = s.shape[0] if s.dim() == 1 else -1
    _check_vector(stat, d_in, name)
    _check_scales(s, d_in)
    return stat / s.to(device=stat.device, dtype=stat.dtype)


def smooth_absmax(absmax: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Per-channel max |x / s| = max |x| / s (s > 0); absmax (d_in,), result in absmax's dtype.
    Raises ValueError on a shape mismatch or s not finite and > 0."""
    return _per_channel_div(absmax, s, "absmax")


def smooth_abssum(abssum: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Per-channel Σ|x / s| = Σ|x| / s (s > 0); abssum (d_in,), result in abssum's dtype. The same
    holds for mean |x|. Raises ValueError on a shape mismatch or s not finite and > 0."""
    return _per_channel_div(abssum, s, "abssum")
