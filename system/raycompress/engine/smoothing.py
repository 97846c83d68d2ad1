"""The engine's side of the quantization schemes: which activation statistics a recipe needs per
input group, and the smoothing step (SmoothQuant or AWQ) that runs on a group's owner before its
weights are quantized.

Order per input group, as the schemes' references do it (llm-compressor runs SmoothQuant / AWQ
before GPTQ or round-to-nearest): statistics of the dense layer's inputs are reduced to the owner;
the smoothing scales s (d_in,) are computed from them; the group's weight columns are multiplied by
s and the norm that feeds the group (`ArchSpec.norm_before`) is divided by it; the statistics are
moved into the smoothed space exactly (H <- diag(1/s) H diag(1/s), max|x| <- max|x| / s), so the
Hessian GPTQ factors and the static activation scales are those of the smoothed inputs, as if the
calibration set had been run through the smoothed layer (up to the rounding of the stored norm).
Groups without a norm before them (o_proj, down_proj) are not smoothed here: llm-awq and
llm-compressor also fold scales into the previous linear (v_proj -> o_proj, up_proj -> down_proj),
which would need the previous group's owner to wait for this one's scales.
"""
from __future__ import annotations

import torch
from torch import nn

from raycompress.config import CompressConfig
from raycompress.engine.stats import InputStats, mean_


def extra_key(group: str, kind: str) -> str:
    """The statistics key of an extra (activation) statistic of `group` (or a KV cache's, kind "kv")."""
    return f"{group}#{kind}"


def extra_kinds(cfg: CompressConfig, scheme, group: str, spec) -> tuple[str, ...]:
    """Activation statistics group `group` needs beyond the algorithm's own: "absmax" for
    SmoothQuant and for schemes whose input activations take a calibrated value (FP8 static
    input_scale, NVFP4 input_global_scale), "abssum" for AWQ; over all calibration rows."""
    if scheme is None:
        return ()
    smoothed = group in dict(spec.norm_before)
    kinds = []
    if (cfg.smoothquant is not None and smoothed) or scheme.static_inputs:
        kinds.append("absmax")
    if cfg.algorithm == "awq" and smoothed:
        kinds.append("abssum")
    return tuple(kinds)


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    setattr(module, name, nn.Parameter(value, requires_grad=False))


@torch.no_grad()
def smooth_group(layer: nn.Module, group: str, names: list[str], spec, cfg: CompressConfig, scheme,
                 stats: InputStats | None, extra: dict[str, InputStats]) -> tuple[dict[str, dict], dict]:
    """Smooth input group `group` of `layer` in place when the recipe asks for it (SmoothQuant, or
    algorithm awq) and a norm feeds the group.

    Args:
        layer: the decoder layer on the owner's device; `names` the group's linears.
        stats: the group's Hessian (sum over tokens, any dtype) or None; transformed in place.
        extra: kind -> the group's reduced "absmax" / "abssum" statistics; absmax transformed in place.
    Returns:
        ({norm module: {"weight", optional "bias"}} to send to the other workers, info for the
        records: smooth_alpha, or awq_ratio / awq_loss / awq_loss_unscaled (per-token mean squared
        output error)).
    Raises:
        ValueError: a statistic is non-finite or shapes disagree (from the algorithms).
    """
    norm_name = dict(spec.norm_before).get(group)
    if norm_name is None or not (cfg.smoothquant is not None or cfg.algorithm == "awq"):
        return {}, {}
    from raycompress.algorithms.smoothquant import fold_scales, smooth_hessian_, smooth_scales

    lins = [layer.get_submodule(n) for n in names]
    weights = [lin.weight.data for lin in lins]
    if cfg.smoothquant is not None:
        s = smooth_scales(extra["absmax"].value.float(), weights, cfg.smoothquant.alpha)
        info = {"smooth_alpha": cfg.smoothquant.alpha}
    else:
        s, info = _awq_scales(weights, stats, extra["abssum"], cfg, scheme)
    norm = layer.get_submodule(norm_name)
    bias = getattr(norm, "bias", None)
    new_w, new_nw, new_nb = fold_scales(weights, norm.weight.data, None if bias is None else bias.data, s)
    for lin, w in zip(lins, new_w):
        _set(lin, "weight", w)
    _set(norm, "weight", new_nw)
    out = {"weight": new_nw}
    if new_nb is not None:
        _set(norm, "bias", new_nb)
        out["bias"] = new_nb
    if stats is not None and stats.kind == "hessian" and stats.value is not None:
        smooth_hessian_(stats.value, s.to(stats.value.device))
    if "absmax" in extra and extra["absmax"].value is not None:
        m = extra["absmax"].value
        m.div_(s.to(m.device, m.dtype))
    return {norm_name: out}, info


def _awq_scales(weights: list[torch.Tensor], stats: InputStats, abssum: InputStats, cfg: CompressConfig, scheme):
    """AWQ's grid search (`algorithms.awq.awq_search`) on the group's per-token mean Hessian and
    mean |x|, with round-to-nearest on the scheme's grid as the quantizer."""
    from raycompress.algorithms.awq import awq_search
    from raycompress.algorithms.quant import rtn

    h = mean_(stats).value
    act_mean = abssum.value.float() / max(1, abssum.tokens)
    spec = scheme.weight_spec
    n_grid = cfg.awq.n_grid if cfg.awq is not None else 20
    r = awq_search(weights, act_mean, h, lambda w: rtn(w, spec).weight, n_grid)
    return r.scales, {"awq_ratio": r.ratio, "awq_loss": r.loss, "awq_loss_unscaled": r.loss_unscaled}
