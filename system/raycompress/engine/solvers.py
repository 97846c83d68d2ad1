"""Adapters from a compression recipe to the pure algorithms: which statistics each needs and how
to call it. Registered by name in `registry.ALGORITHMS`; the engine never branches on a name.

`solve(W, stats, cfg)` returns (tensors, info): tensors["weight"] is the weight to run with
(dequantized for quantized methods); quantized methods add "weight_scale" and
"weight_zero_point" (d_out, n_groups), which the checkpoint writer packs.

Structured methods (Cus-Prun) solve a whole FFN at once: `layer_solve(up, down_name, down, stats, cfg, width)`
takes the up/gate and down projections' tensors and per-subset statistics of the down input, and
returns ({module: tensors}, info) with the FFN width shrunk."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from raycompress.algorithms.cus_prun import kept_count, neuron_impact, relevance, select_neurons, shrink_ffn
from raycompress.algorithms.gptq import gptq_quantize
from raycompress.algorithms.magnitude import magnitude_prune
from raycompress.algorithms.quant import QuantSpec
from raycompress.algorithms.sparsegpt import sparsegpt_prune
from raycompress.algorithms.wanda import wanda_prune
from raycompress.config import CompressConfig
from raycompress.engine.stats import InputStats
from raycompress.registry import ALGORITHMS


@dataclass(frozen=True)
class Algorithm:
    """stats: which InputStats kind it needs (None = data-free); solve(W, stats, cfg) -> (W', info);
    layer_solve: set for structured methods, which the pipeline runs once per layer instead."""

    stats: str | None
    solve: Callable[[torch.Tensor, InputStats | None, CompressConfig], tuple[dict[str, torch.Tensor], dict]] | None
    cost: Callable[[int, int], float]  # relative solve cost for (d_out, d_in), for load balancing
    layer_solve: Callable | None = None


def _nm(cfg: CompressConfig) -> tuple[int, int] | None:
    return tuple(cfg.n_m) if cfg.n_m else None


def _spec(cfg: CompressConfig) -> QuantSpec:
    q = cfg.quant
    return QuantSpec(bits=q.bits, symmetric=q.symmetric, group_size=q.group_size)


def _hessian(stats: InputStats) -> torch.Tensor:
    return (stats.value / max(1, stats.tokens)).float()  # mean x x^T; the scale does not change the result


def _magnitude(w, stats, cfg):
    w2, _ = magnitude_prune(w, cfg.sparsity, _nm(cfg))
    return {"weight": w2}, {}


def _wanda(w, stats, cfg):
    w2, _ = wanda_prune(w, stats.value, cfg.sparsity, _nm(cfg))
    return {"weight": w2}, {}


def _sparsegpt(w, stats, cfg):
    h = _hessian(stats)
    if cfg.quant is None:
        w2, _, used = sparsegpt_prune(w, h, cfg.sparsity, _nm(cfg), cfg.block_size, cfg.damping)
        return {"weight": w2}, {"damping": used}
    # SparseGPT paper Sec. 3.5: joint sparsification and quantization in one OBS sweep
    q, _, used, scale, zero = sparsegpt_prune(w, h, cfg.sparsity, _nm(cfg), cfg.block_size, cfg.damping, _spec(cfg))
    return {"weight": q, "weight_scale": scale, "weight_zero_point": zero}, {"damping": used}


def _gptq(w, stats, cfg):
    q, scale, zero, used = gptq_quantize(w, _hessian(stats), _spec(cfg), cfg.block_size, cfg.damping, cfg.quant.act_order)
    return {"weight": q, "weight_scale": scale, "weight_zero_point": zero}, {"damping": used}


def _cus_prun(up: dict, down_name: str, down: dict, stats: dict[str, InputStats], cfg: CompressConfig,
              width: int | None):
    """Cus-Prun on one decoder layer's FFN; stats: dimension -> squared norms of the down input."""
    w_down = down["weight"]  # (d_model, d_ff)
    d_ff = w_down.shape[1]
    impacts = {d: neuron_impact(s.value / max(1, s.tokens), w_down) for d, s in stats.items()}
    keep = select_neurons(relevance(impacts), kept_count(d_ff, float(cfg.sparsity), cfg.cus_prun.multiple_of))
    new_up, new_down = shrink_ffn(up, down, keep, width)
    dropped = torch.ones(d_ff, dtype=torch.bool)
    dropped[keep] = False
    removed = {d: float(v[dropped].sum() / v.sum()) if v.sum() > 0 else 0.0 for d, v in impacts.items()}
    info = {"neurons_kept": keep.numel(), "neurons": d_ff, "width": new_down["weight"].shape[1],
            "sparsity": 1.0 - keep.numel() / d_ff, "impact_removed": removed,
            "rel_error": sum(removed.values()) / len(removed)}
    return {**new_up, down_name: new_down}, info


ALGORITHMS.register("magnitude")(Algorithm(None, _magnitude, lambda o, i: o * i))
ALGORITHMS.register("wanda")(Algorithm("sqnorm", _wanda, lambda o, i: o * i))
ALGORITHMS.register("sparsegpt")(Algorithm("hessian", _sparsegpt, lambda o, i: i * i * (o + i)))
ALGORITHMS.register("gptq")(Algorithm("hessian", _gptq, lambda o, i: i * i * (o + i)))
ALGORITHMS.register("cus_prun")(Algorithm("sqnorm", None, lambda o, i: o, layer_solve=_cus_prun))
