"""The sequential layer pipeline: for each decoder layer, statistics data-parallel over workers,
solves spread over workers by cost, compressed layer propagated, shard persisted, progress saved.

The pipeline talks to its workers through a `Backend` (call a method on worker k, get results),
so the same loop runs in-process (`LocalBackend`) and over Ray actors (`distributed.compress`).
Finished layers are recorded in `progress.json` with a fingerprint of model, calibration set and
recipe; a rerun replays finished layers from their shards instead of recompressing them.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from raycompress.config import CompressConfig
from raycompress.models.checkpoint import finalize_checkpoint, shard_name, write_atomic_text
from raycompress.models.quantized import quantization_config
from raycompress.models.weights import OffloadedModel
from raycompress.registry import ALGORITHMS

log = logging.getLogger(__name__)


class Backend(Protocol):
    size: int

    def call(self, k: int, method: str, *args: Any) -> Any: ...
    def get(self, handles: Any) -> Any: ...


class LocalBackend:
    """Workers in this process; handles are plain values."""

    def __init__(self, workers: list) -> None:
        self.workers = workers
        self.size = len(workers)

    def call(self, k: int, method: str, *args: Any) -> Any:
        return getattr(self.workers[k], method)(*args)

    def get(self, handles: Any) -> Any:
        return handles


class FingerprintMismatch(RuntimeError):
    """The output folder holds progress of a different job."""


def assign_owners(costs: dict[str, float], k: int) -> dict[str, int]:
    """Longest-processing-time-first assignment of modules to k workers (deterministic)."""
    load = [0.0] * k
    owners: dict[str, int] = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        j = min(range(k), key=lambda i: (load[i], i))
        owners[name] = j
        load[j] += costs[name]
    return owners


def _plan(model: OffloadedModel, cfg: CompressConfig):
    """Targets, their input group, and their solve cost from the architecture table."""
    spec = model.spec
    targets = list(cfg.targets or spec.linears)
    unknown = [t for t in targets if t not in spec.linears]
    if unknown:
        raise ValueError(f"compress.targets: {unknown} are not linears of a decoder layer; known: {list(spec.linears)}")
    group_of = {name: group[0] for group in spec.input_groups for name in group}
    layer0 = model.skeleton.get_submodule(model.layer_prefix(0))
    algo = ALGORITHMS.get(cfg.algorithm)
    costs = {}
    for t in targets:
        lin = layer0.get_submodule(t)
        costs[t] = algo.cost(lin.out_features, lin.in_features)
    return targets, group_of, costs, algo


class Progress:
    """Durable record of finished layers in `out_dir/progress.json`."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self.done: list[int] = []
        self.records: dict[str, list[dict]] = {}
        self.extra: dict = {}
        if path.is_file():
            state = json.loads(path.read_text())
            if state.get("fingerprint") != fingerprint:
                raise FingerprintMismatch(
                    f"{path} belongs to another job (fingerprint {state.get('fingerprint')} != {fingerprint}); "
                    "use a fresh output folder or delete it"
                )
            self.done = list(state.get("done", []))
            self.records = dict(state.get("records", {}))
            self.extra = dict(state.get("extra", {}))

    def mark(self, idx: int, records: list[dict]) -> None:
        if idx not in self.done:
            self.done.append(idx)
        self.records[str(idx)] = records
        state = {"fingerprint": self.fingerprint, "done": self.done, "records": self.records, "extra": self.extra}
        write_atomic_text(self.path, json.dumps(state))


def owl_prepass(backend: Backend, model: OffloadedModel, cfg: CompressConfig, targets, group_of) -> list[float]:
    """OWL: one dense pass over all layers for their outlier ratios -> per-layer sparsities."""
    from raycompress.algorithms.owl import owl_sparsities

    ranks = range(backend.size)
    kinds = {group_of[t]: "sqnorm" for t in targets}
    ratios = []
    for i in tqdm(range(model.num_layers), desc="owl pre-pass", unit="layer"):
        backend.get([backend.call(k, "begin_layer", i) for k in ranks])
        partials = [backend.call(k, "accumulate", kinds) for k in ranks]
        out, total = backend.get(backend.call(0, "outlier_counts", targets, group_of, cfg.owl.m, *partials))
        ratios.append(out / total)
        backend.get([backend.call(k, "propagate_dense") for k in ranks])
        backend.get([backend.call(k, "end_layer") for k in ranks])
    backend.get([backend.call(k, "reset") for k in ranks])
    return owl_sparsities(ratios, float(cfg.sparsity), cfg.owl.lam)


def layer_sparsities(backend: Backend, model: OffloadedModel, cfg: CompressConfig, progress, targets, group_of) -> list[float]:
    """Sparsity per decoder layer: the recipe's value, its list, or OWL's (computed once, kept in progress)."""
    n = model.num_layers
    if isinstance(cfg.sparsity, list):
        if len(cfg.sparsity) != n:
            raise ValueError(f"compress.sparsity lists {len(cfg.sparsity)} values for {n} decoder layers")
        return list(cfg.sparsity)
    if cfg.owl is None:
        return [float(cfg.sparsity)] * n
    if "owl" not in progress.extra:
        progress.extra["owl"] = owl_prepass(backend, model, cfg, targets, group_of)
    return progress.extra["owl"]


def _stat_plan(model: OffloadedModel, cfg: CompressConfig, algo, targets, group_of) -> tuple[dict[str, str], bool]:
    """(input group -> statistics kind, split by row subset?) for one layer's accumulate call."""
    if algo.layer_solve is not None:  # structured: the down projection's input, per dimension
        return {model.spec.mlp_down: algo.stats}, True
    kinds = {group_of[t]: algo.stats for t in targets} if algo.stats else {}
    return kinds, cfg.mixcal is not None


def _ffn_width(model: OffloadedModel, cfg: CompressConfig, sparsity: list[float]) -> int | None:
    """Structured methods with per-layer counts: the widest layer's kept neurons (others are padded)."""
    if cfg.cus_prun is None or not cfg.cus_prun.per_layer_counts:
        return None
    from raycompress.algorithms.cus_prun import kept_count

    d_ff = int(getattr(model.config, model.spec.intermediate_key))
    return max(kept_count(d_ff, s, cfg.cus_prun.multiple_of) for s in sparsity)


def _config_updates(model: OffloadedModel, cfg: CompressConfig, records: list[dict]) -> dict:
    """config.json changes: the quantization block, or the shrunk FFN width (and true per-layer counts)."""
    if cfg.quant is not None:
        return {"quantization_config": quantization_config(cfg.quant, ignore=["lm_head"])}
    widths = [r["width"] for r in records if "width" in r]
    if not widths:
        return {}
    updates: dict = {model.spec.intermediate_key: max(widths)}
    if cfg.cus_prun is not None and cfg.cus_prun.per_layer_counts:
        updates["raycompress_ffn_neurons_kept"] = [r["neurons_kept"] for r in records if "width" in r]
    return updates


def compress_layers(backend: Backend, model: OffloadedModel, cfg: CompressConfig, out_dir: Path, fingerprint: str) -> list[dict]:
    """Compress every decoder layer of `model` into `out_dir/model`; returns per-module records."""
    targets, group_of, costs, algo = _plan(model, cfg)
    owners = assign_owners(costs, backend.size)
    group_kinds, split = _stat_plan(model, cfg, algo, targets, group_of)
    ckpt = out_dir / "model"
    ckpt.mkdir(parents=True, exist_ok=True)
    total = model.num_layers + 1
    progress = Progress(out_dir / "progress.json", fingerprint)
    ranks = range(backend.size)
    sparsity = layer_sparsities(backend, model, cfg, progress, targets, group_of)
    width = _ffn_width(model, cfg, sparsity)
    for i in tqdm(range(model.num_layers), desc=f"compress[{cfg.algorithm}]", unit="layer"):
        path = str(ckpt / shard_name(i, total))
        if i in progress.done and Path(path).is_file():
            backend.get([backend.call(k, "replay_layer", i, path, cfg.quant) for k in ranks])
            continue
        backend.get([backend.call(k, "begin_layer", i) for k in ranks])
        partials = [backend.call(k, "accumulate", group_kinds, split) for k in ranks]
        layer_cfg = cfg.for_layer(sparsity[i])
        if algo.layer_solve is not None:  # one structured solve per layer, owners take turns
            solved = backend.call(i % backend.size, "solve_layer", layer_cfg, width, *partials)
            backend.get([backend.call(k, "apply_solved", solved) for k in ranks])
        else:
            new_w = [backend.call(owners[t], "solve", t, group_of[t], layer_cfg, *partials) for t in targets]
            backend.get([backend.call(k, "apply", targets, *new_w) for k in ranks])
        backend.get(backend.call(0, "write_layer", path, cfg.quant))
        records = [r for part in backend.get([backend.call(k, "pop_infos") for k in ranks]) for r in part]
        backend.get([backend.call(k, "end_layer") for k in ranks])
        progress.mark(i, sorted(records, key=lambda r: r["module"]))
    rest = ckpt / shard_name(model.num_layers, total)
    backend.get(backend.call(0, "write_outside_layers", str(rest)))
    shards = [ckpt / shard_name(i, total) for i in range(total)]
    records = [r for i in range(model.num_layers) for r in progress.records.get(str(i), [])]
    finalize_checkpoint(ckpt, model.model_dir, shards, _config_updates(model, cfg, records))
    return records
