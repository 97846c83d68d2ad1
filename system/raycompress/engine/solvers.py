"""Adapters from a compression recipe to the pure algorithms: which statistics each needs and how
to call it on one input group. Registered by name in `registry.ALGORITHMS`; the engine never
branches on a name.

`prepare(stats, cfg)` turns one input group's summed statistics into what its linears share
(consumed: the Hessian's buffer becomes the OBS factor); `solve(W, context, cfg)` then compresses
one linear, W (d_out, d_in) in the checkpoint's dtype on the worker's device, and returns
(tensors, info): tensors["weight"] is the weight to run with, in W's dtype (dequantized for
quantized methods); quantized methods add `models.quantized.qparams` ("weight_scale", and
"weight_zero_point" when asymmetric, (d_out, n_groups)), which the checkpoint writer packs. info["loss"] (OBS methods) is the sweep's
error, from which the worker reports the relative output error ||(W - Ŵ) X||² / ||W X||² with the
outputs' squared norms recorded during the statistics pass.

Structured methods (Cus-Prun) solve a whole FFN at once: `layer_solve(up, down_name, down, stats, cfg, width)`
takes the up/gate and down projections' tensors and per-subset statistics of the down input, and
returns ({module: tensors}, info) with the FFN width shrunk."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from raycompress.algorithms.cus_prun import kept_count, neuron_impact, relevance, select_neurons, shrink_ffn
from raycompress.algorithms.gptq import gptq_quantize
from raycompress.algorithms.magnitude import magnitude_prune
from raycompress.algorithms.obs import obs_factor_
from raycompress.algorithms.quant import rtn, with_weight_dtype
from raycompress.algorithms.sparsegpt import sparsegpt_prune
from raycompress.algorithms.wanda import wanda_prune
from raycompress.config import CompressConfig
from raycompress.engine.stats import InputStats, mean_
from raycompress.models.quantized import qparams, resolve
from raycompress.registry import ALGORITHMS

@dataclass(frozen=True)
class Algorithm:
    """stats: which InputStats kind it needs (None = data-free);
    prepare(stats, cfg) -> context shared by an input group's linears (the OBS factor, the norms);
    solve(W, context, cfg) -> (tensors, info) for one linear; info["loss"], where given, is the
    sweep's error tr(D H_λ D^T) with H the per-token mean Hessian;
    layer_solve: set for structured methods, which the pipeline runs once per layer instead."""

    stats: str | None
    prepare: Callable[[InputStats | None, CompressConfig], Any] | None
    solve: Callable[[torch.Tensor, Any, CompressConfig], tuple[dict[str, torch.Tensor], dict]] | None
    cost: Callable[[int, int], float]  # relative solve cost for (d_out, d_in), for load balancing
    layer_solve: Callable | None = None
    # FLOPs of one input group's solve: (list of (d_out, d_in) of its linears) -> float
    flops: Callable[[list[tuple[int, int]]], float] = lambda shapes: float(sum(o * i for o, i in shapes))


def _nm(cfg: CompressConfig) -> tuple[int, int] | None:
    return tuple(cfg.n_m) if cfg.n_m else None




def _none(stats, cfg):
    return None


def _norms(stats, cfg):
    return stats.value


def _magnitude(w, ctx, cfg):
    return {"weight": magnitude_prune(w, cfg.sparsity, _nm(cfg))[0]}, {}


def _wanda(w, norms, cfg):
    return {"weight": wanda_prune(w, norms, cfg.sparsity, _nm(cfg))[0].to(w.dtype)}, {}


def _factor(stats: InputStats, cfg: CompressConfig):
    """The group's OBS factor in the Hessian's own buffer (mean x x^T: the scale does not change
    the result, and keeps the damping relative)."""
    mean_(stats)
    h, stats.value = stats.value, None
    scheme = resolve(cfg)
    act_order = scheme is not None and scheme.act_order and cfg.algorithm == "gptq"
    return obs_factor_(h if h.dtype == torch.float32 else h.float(), cfg.damping, act_order)


def _sparsegpt(w, f, cfg):
    scheme = resolve(cfg)
    quant = with_weight_dtype(scheme.weight_spec, w.dtype) if scheme is not None else None  # scales as stored
    r = sparsegpt_prune(w, None, cfg.sparsity, _nm(cfg), cfg.block_size, quant=quant, factor=f)
    tensors = {"weight": r.weight}
    if quant is not None:  # SparseGPT paper Sec. 3.5: joint sparsification and quantization
        tensors.update(qparams(r, scheme, w.dtype))
    return tensors, {"damping": r.damping, "loss": r.loss}


def _gptq(w, f, cfg):
    scheme = resolve(cfg)
    r = gptq_quantize(w, None, scheme.weight_spec, cfg.block_size, factor=f)
    return {"weight": r.weight, **qparams(r, scheme, w.dtype)}, {"damping": r.damping, "loss": r.loss}


def _mean_hessian(stats, cfg):
    """AWQ: the group's per-token mean Hessian (already smoothed by `engine.smoothing`), kept to
    report the round-to-nearest error tr(D H D^T)."""
    return mean_(stats).value


def _rtn(w, h, cfg):
    """Round to nearest on the scheme's grid (the GPTQ paper's RTN baseline; llm-compressor's
    QuantizationModifier); with a per-token mean Hessian h, info["loss"] = tr(D h D^T)."""
    scheme = resolve(cfg)
    r = rtn(w, scheme.weight_spec)
    info = {}
    if h is not None:
        d = w.to(h.dtype) - r.weight.to(h.dtype)
        info["loss"] = float(((d @ h) * d).sum())
    return {"weight": r.weight.to(w.dtype), **qparams(r, scheme, w.dtype)}, info


def _cus_prun(up: dict, down_name: str, down: dict, stats: dict[str, InputStats], cfg: CompressConfig,
              width: int | None):
    """Cus-Prun on one decoder layer's FFN; stats: dimension -> squared norms of the down input."""
    w_down = down["weight"]  # (d_model, d_ff)
    d_ff = w_down.shape[1]
    impacts = {d: neuron_impact(s.value.double() / max(1, s.tokens), w_down).cpu() for d, s in stats.items()}
    keep = select_neurons(relevance(impacts), kept_count(d_ff, float(cfg.sparsity), cfg.cus_prun.multiple_of))
    new_up, new_down = shrink_ffn(up, down, keep.to(w_down.device), width)
    dropped = torch.ones(d_ff, dtype=torch.bool)
    dropped[keep] = False
    removed = {d: float(v[dropped].sum() / v.sum()) if v.sum() > 0 else 0.0 for d, v in impacts.items()}
    info = {"neurons_kept": keep.numel(), "neurons": d_ff, "width": new_down["weight"].shape[1],
            "sparsity": 1.0 - keep.numel() / d_ff, "impact_removed": removed,
            "rel_error": sum(removed.values()) / len(removed)}
    return {**new_up, down_name: new_down}, info


def _obs_flops(shapes: list[tuple[int, int]]) -> float:
    """FLOPs (a multiply and an add count 2) of one input group's OBS solve, as the algorithm needs
    them (the triangular inverse, done with full GEMMs, does about d³/3 more): the factor once,
    reverse Cholesky d³/3 + triangular inverse d³/3, plus per linear the sweep's lazy updates
    d_out·d_in² and in-block updates d_out·d_in·B (B = 128)."""
    d = shapes[0][1]
    return 2.0 / 3.0 * d**3 + sum(o * i * i + o * i * 128 for o, i in shapes)


ALGORITHMS.register("magnitude")(Algorithm(None, _none, _magnitude, lambda o, i: o * i))
ALGORITHMS.register("wanda")(Algorithm("sqnorm", _norms, _wanda, lambda o, i: o * i))
ALGORITHMS.register("sparsegpt")(Algorithm("hessian", _factor, _sparsegpt, lambda o, i: i * i * (o + i), flops=_obs_flops))
ALGORITHMS.register("gptq")(Algorithm("hessian", _factor, _gptq, lambda o, i: i * i * (o + i), flops=_obs_flops))
ALGORITHMS.register("rtn")(Algorithm(None, _none, _rtn, lambda o, i: o * i))
ALGORITHMS.register("awq")(Algorithm("hessian", _mean_hessian, _rtn, lambda o, i: i * i * o))
ALGORITHMS.register("cus_prun")(Algorithm("sqnorm", None, None, lambda o, i: o, layer_solve=_cus_prun))
