"""Adapters from a compression recipe to the pure algorithms: which statistics each needs and how
to call it. Registered by name in `registry.ALGORITHMS`; the engine never branches on a name."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from raycompress.algorithms.magnitude import magnitude_prune
from raycompress.algorithms.sparsegpt import sparsegpt_prune
from raycompress.algorithms.wanda import wanda_prune
from raycompress.config import CompressConfig
from raycompress.engine.stats import InputStats
from raycompress.registry import ALGORITHMS


@dataclass(frozen=True)
class Algorithm:
    """stats: which InputStats kind it needs (None = data-free); solve(W, stats, cfg) -> (W', info)."""

    stats: str | None
    solve: Callable[[torch.Tensor, InputStats | None, CompressConfig], tuple[torch.Tensor, dict]]
    cost: Callable[[int, int], float]  # relative solve cost for (d_out, d_in), for load balancing


def _nm(cfg: CompressConfig) -> tuple[int, int] | None:
    return tuple(cfg.n_m) if cfg.n_m else None


def _magnitude(w, stats, cfg):
    w2, _ = magnitude_prune(w, cfg.sparsity, _nm(cfg))
    return w2, {}


def _wanda(w, stats, cfg):
    w2, _ = wanda_prune(w, stats.value, cfg.sparsity, _nm(cfg))
    return w2, {}


def _sparsegpt(w, stats, cfg):
    h = (stats.value / max(1, stats.tokens)).float()  # mean x x^T; the scale does not change the result
    w2, _, used = sparsegpt_prune(w, h, cfg.sparsity, _nm(cfg), cfg.block_size, cfg.damping)
    return w2, {"damping": used}


ALGORITHMS.register("magnitude")(Algorithm(None, _magnitude, lambda o, i: o * i))
ALGORITHMS.register("wanda")(Algorithm("sqnorm", _wanda, lambda o, i: o * i))
ALGORITHMS.register("sparsegpt")(Algorithm("hessian", _sparsegpt, lambda o, i: i * i * (o + i)))
