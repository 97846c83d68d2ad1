"""Adapters from a compression recipe to the pure algorithms: which statistics each needs and how
to call it. Registered by name in `registry.ALGORITHMS`; the engine never branches on a name.

`solve(W, stats, cfg)` returns (tensors, info): tensors["weight"] is the weight to run with
(dequantized for quantized methods); quantized methods add "weight_scale" and
"weight_zero_point" (d_out, n_groups), which the checkpoint writer packs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

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
    """stats: which InputStats kind it needs (None = data-free); solve(W, stats, cfg) -> (W', info)."""

    stats: str | None
    solve: Callable[[torch.Tensor, InputStats | None, CompressConfig], tuple[dict[str, torch.Tensor], dict]]
    cost: Callable[[int, int], float]  # relative solve cost for (d_out, d_in), for load balancing


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


ALGORITHMS.register("magnitude")(Algorithm(None, _magnitude, lambda o, i: o * i))
ALGORITHMS.register("wanda")(Algorithm("sqnorm", _wanda, lambda o, i: o * i))
ALGORITHMS.register("sparsegpt")(Algorithm("hessian", _sparsegpt, lambda o, i: i * i * (o + i)))
ALGORITHMS.register("gptq")(Algorithm("hessian", _gptq, lambda o, i: i * i * (o + i)))
