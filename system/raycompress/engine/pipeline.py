"""The sequential layer pipeline: for each decoder layer, statistics data-parallel over workers,
each input group's statistics reduced (a binary tree, each partial sent once) to the one worker
that solves that group, compressed weights sent once to every other worker, the compressed layer
propagated in place, the shard persisted and hashed, progress saved.

The pipeline talks to its workers through a `Backend` whose workers have `LayerWorker`'s methods
(`WorkerAPI`); in-process (`LocalBackend`) a call returns its value, over Ray
(`distributed.compress`) an object ref that is passed on unresolved.
Finished layers are recorded in `progress.json` with a fingerprint of model, calibration set and
recipe; a rerun replays finished layers from their shards instead of recompressing them. The
output folder is a location (local path or URI, `storage.uri`): shards and progress are written
there atomically, by whichever worker or driver holds them, and read back from there on resume.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from tqdm import tqdm

from raycompress.config import CompressConfig
from raycompress.models.checkpoint import finalize_checkpoint, shard_name
from raycompress.engine.experts import (checkpoint_module, expert_tokens, fallback_config, layer_groups, low_token_plan,
                                        parse_expert, weight)
from raycompress.engine.smoothing import extra_key, extra_kinds
from raycompress.models.moe import is_moe_layer, num_experts
from raycompress.models.quantized import quantization_config, resolve
from raycompress.models.weights import OffloadedModel
from raycompress.registry import ALGORITHMS
from raycompress.storage import uri

log = logging.getLogger(__name__)
Handle = Any  # a value (in-process) or a Ray ObjectRef


class WorkerAPI(Protocol):
    """`engine.worker.LayerWorker`'s methods as the pipeline calls them; each returns a Handle."""

    def begin_layer(self, idx: int) -> Handle: ...
    def accumulate(self, groups: dict, split: bool, extras: dict | None = None, kv: str | None = None,
                   all_tokens: bool = False) -> Handle: ...
    def export_stats(self, keys: list[str]) -> Handle: ...
    def reduce_stats(self, partial: Handle) -> Handle: ...
    def drop_modules(self, names: list[str]) -> Handle: ...
    def solve_group(self, group: str, names: list[str], cfg: CompressConfig, export: bool) -> Handle: ...
    def solve_layer(self, cfg: CompressConfig, width: int | None, export: bool) -> Handle: ...
    def apply(self, *solved: Handle) -> Handle: ...
    def outlier_counts(self, targets: list[str], group_of: dict[str, str], m: float) -> Handle: ...
    def propagate_dense(self) -> Handle: ...
    def reset(self) -> Handle: ...
    def write_layer(self, path: str, scheme: Any) -> Handle: ...
    def replay_layer(self, idx: int, shard: str, scheme: Any) -> Handle: ...
    def write_outside_layers(self, path: str) -> Handle: ...
    def end_layer(self) -> Handle: ...
    def pop_infos(self) -> Handle: ...
    def report(self) -> Handle: ...


class Backend(Protocol):
    workers: Sequence[WorkerAPI]

    def get(self, handles: Any) -> Any: ...

    def reduce(self, owner: int, keys: list[str], names: list[str]) -> list[Handle]:
        """Sum statistics `keys` (carrying output norms of linears `names`) onto worker `owner`."""


class LocalBackend:
    """Workers in this process; handles are plain values."""

    def __init__(self, workers: list) -> None:
        self.workers = workers

    def get(self, handles: Any) -> Any:
        return handles

    def reduce(self, owner: int, keys: list[str], names: list[str]) -> list[Handle]:
        return reduce_to(self, owner, keys)


class FingerprintMismatch(RuntimeError):
    """The output folder holds progress of a different job."""


def assign_owners(costs: dict[str, float], k: int) -> dict[str, int]:
    """Longest-processing-time-first assignment of items to k workers (deterministic)."""
    load = [0.0] * k
    owners: dict[str, int] = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        j = min(range(k), key=lambda i: (load[i], i))
        owners[name] = j
        load[j] += costs[name]
    return owners


class Plan:
    """What one layer's compression does: targets by input group, owners of each group, and the
    statistics to accumulate. Built from the architecture table, never from names.

    `layer`: the decoder layer whose structure the plan follows (default 0). In a mixture-of-experts
    model (`ArchSpec.moe`) a layer's groups are `engine.experts.layer_groups`: the dense groups, the
    shared expert's, then every routed expert's two groups ("<experts>.<e>.gate" for gate/up,
    "<experts>.<e>.down"), shapes from the fused parameters; owners are balanced over all of them by
    solve cost (LPT), so a layer's experts are solved by all workers at once. A target names a
    linear or a dotted prefix of linears ("mlp.experts" all experts, "mlp.experts.3" one).

    Raises:
        ValueError: a target that is no linear of the layer; OWL or a structured method on an MoE
            layer (their layer-wide passes read `nn.Linear` modules only).
    """

    def __init__(self, model: OffloadedModel, cfg: CompressConfig, k: int, layer: int = 0) -> None:
        spec = self.spec = model.spec
        self.layer = layer
        self.algo = ALGORITHMS.get(cfg.algorithm)
        layer0 = model.skeleton.get_submodule(model.layer_prefix(layer))
        self.moe = is_moe_layer(layer0, spec)
        all_groups = layer_groups(layer0, spec)
        linears = [name for group in all_groups for name in group]
        self.linears = linears
        self.targets = _select(cfg.targets, linears, spec)
        if self.moe and (cfg.owl is not None or self.algo.layer_solve is not None):
            raise ValueError(f"compress.{'owl' if cfg.owl is not None else 'algorithm'}: not supported on "
                             f"mixture-of-experts layers (decoder layer {layer}, module {spec.moe.block})")
        self.group_of = {name: group[0] for group in all_groups for name in group}
        self.groups: dict[str, list[str]] = {}
        for t in self.targets:
            self.groups.setdefault(self.group_of[t], []).append(t)
        self.shapes = {t: tuple(weight(layer0, spec, t).shape) for t in self.targets}  # (d_out, d_in)
        self.d_in = {g: self.shapes[names[0]][1] for g, names in self.groups.items()}
        costs = {g: sum(self.algo.cost(*self.shapes[t]) for t in names) for g, names in self.groups.items()}
        self.owners = assign_owners(costs, k)
        self.k = k
        self.structured = self.algo.layer_solve is not None
        self.split = self.structured or cfg.mixcal is not None
        self.scheme = resolve(cfg)
        self.all_tokens = cfg.moe is not None and cfg.moe.policy == "all_tokens"
        self.experts = {g for g in self.groups if parse_expert(spec, g) is not None}
        self.n_experts = num_experts(model.config, spec) if self.moe else 0
        # activation statistics the scheme or the smoothing needs, per group, over all rows
        self.extras = {g: kinds for g in self.groups if (kinds := extra_kinds(cfg, self.scheme, g, spec))}
        self.kv = spec.attention if self.scheme is not None and self.scheme.kv is not None else None
        if self.structured:  # the down projection's input, per dimension
            self.stat_groups = {spec.mlp_down: (self.algo.stats, [spec.mlp_down])}
            self.d_in[spec.mlp_down] = layer0.get_submodule(spec.mlp_down).in_features
        else:
            self.stat_groups = {g: (self.algo.stats, names) for g, names in self.groups.items()
                                if self.algo.stats or g in self.extras}

    @property
    def data_free(self) -> bool:
        """No statistic of any kind (a data-free method such as FP8_DYNAMIC by round to nearest):
        the layer's inputs are never looked at, so nothing needs to run through it."""
        return not self.stat_groups and not self.kv and not self.structured and not self.moe

    def keys(self, group: str, subsets: list[str]) -> list[str]:
        """Statistics keys of `group`: the algorithm's (per subset when split), then its extras."""
        own = ([f"{group}@{s}" for s in subsets] if self.split else [group]) if self.algo.stats else []
        return own + [extra_key(group, kind) for kind in self.extras.get(group, ())]

    def solve_order(self, rank: int) -> list[str]:
        """Groups this rank solves, smallest first (their Hessians are freed before the largest solve)."""
        mine = [g for g in self.groups if self.owners[g] == rank]
        return sorted(mine, key=lambda g: (self.shapes[self.groups[g][0]][1], g))


def _select(targets: list[str] | None, linears: list[str], spec) -> list[str]:
    """The layer's linears named by `targets` (a name or a dotted prefix each; None: all), in the
    layer's order. A target that names nothing in this layer but a linear of another layer kind of
    the architecture (an MoE model's dense-MLP layers) is skipped here.

    Raises:
        ValueError: a target that names no linear of any decoder layer (lists the known ones).
    """
    if targets is None:
        return list(linears)
    hit = {t: [n for n in linears if n == t or n.startswith(t + ".")] for t in targets}
    known = set(spec.linears) | ({n for g in spec.moe.shared_groups + spec.moe.dense_groups for n in g}
                                 if spec.moe is not None else set())
    unknown = [t for t, names in hit.items() if not names and t not in known]
    if unknown:
        raise ValueError(f"compress.targets: {unknown} are not linears of a decoder layer; known: {linears}")
    chosen = {n for names in hit.values() for n in names}
    return [n for n in linears if n in chosen]


def layer_kinds(model: OffloadedModel) -> list[int]:
    """One decoder layer index per distinct layer structure (an MoE model's sparse and dense-MLP
    layers), first occurrence each; [0] for a dense model."""
    if model.spec.moe is None:
        return [0]
    seen: dict[bool, int] = {}
    for i in range(model.num_layers):
        seen.setdefault(is_moe_layer(model.skeleton.get_submodule(model.layer_prefix(i)), model.spec), i)
    return sorted(seen.values())


def reduce_to(backend: Backend, owner: int, keys: list[str]) -> list[Handle]:
    """Binary-tree reduction of statistics `keys` onto worker `owner`: in round s, worker q (owner-
    relative, q % 2s == 0) adds the partial of q + s. Each partial is sent once; no worker holds
    more than one received partial at a time."""
    k, handles, step = len(backend.workers), [], 1
    while step < k:
        for q in range(0, k, 2 * step):
            if q + step < k:
                src, dst = (q + step + owner) % k, (q + owner) % k
                part = backend.workers[src].export_stats(keys)
                handles.append(backend.workers[dst].reduce_stats(part))
        step *= 2
    return handles


class Progress:
    """Durable record of finished layers in `out/progress.json` (local or URI; one atomic write per
    layer): per-module records and per-layer facts (seconds, shard SHA-256, bytes, tensor names).

    Raises:
        FingerprintMismatch: the file belongs to another job.
    """

    def __init__(self, path: str | Path, fingerprint: str) -> None:
        self.path = str(path)
        self.fingerprint = fingerprint
        self.done: list[int] = []
        self.records: dict[str, list[dict]] = {}
        self.layers: dict[str, dict] = {}
        self.extra: dict = {}
        if uri.exists(self.path):
            state = json.loads(uri.read_text(self.path))
            if state.get("fingerprint") != fingerprint:
                raise FingerprintMismatch(
                    f"{uri.display(self.path)} belongs to another job (fingerprint {state.get('fingerprint')} != {fingerprint}); "
                    "use a fresh output folder or delete it"
                )
            self.done = list(state.get("done", []))
            self.records = dict(state.get("records", {}))
            self.layers = dict(state.get("layers", {}))
            self.extra = dict(state.get("extra", {}))

    def mark(self, idx: int, records: list[dict], layer: dict) -> None:
        if idx not in self.done:
            self.done.append(idx)
        self.records[str(idx)] = records
        self.layers[str(idx)] = layer
        state = {"fingerprint": self.fingerprint, "done": self.done, "records": self.records,
                 "layers": self.layers, "extra": self.extra}
        uri.write_text(self.path, json.dumps(state))


def _all(backend: Backend, method: str, *args: Any) -> list:
    """Call `method` on every worker and wait."""
    return backend.get([getattr(w, method)(*args) for w in backend.workers])


def owl_prepass(backend: Backend, model: OffloadedModel, cfg: CompressConfig, plan: Plan) -> list[float]:
    """OWL: one dense pass over all layers for their outlier ratios -> per-layer sparsities."""
    from raycompress.algorithms.owl import owl_sparsities

    groups = {g: ("sqnorm", names) for g, names in plan.groups.items()}
    ratios = []
    for i in tqdm(range(model.num_layers), desc="owl pre-pass", unit="layer", disable=None):
        _all(backend, "begin_layer", i)
        _all(backend, "accumulate", groups, False)
        backend.get([h for g, (_, names) in groups.items() for h in backend.reduce(0, [g], names)])
        out, total = backend.get(backend.workers[0].outlier_counts(plan.targets, plan.group_of, cfg.owl.m))
        ratios.append(out / total)
        _all(backend, "propagate_dense")
        _all(backend, "end_layer")
    _all(backend, "reset")
    return owl_sparsities(ratios, float(cfg.sparsity), cfg.owl.lam)


def layer_sparsities(backend: Backend, model: OffloadedModel, cfg: CompressConfig, progress, plan: Plan) -> list[float]:
    """Sparsity per decoder layer: the recipe's value, its list, or OWL's (computed once, kept in progress)."""
    n = model.num_layers
    if isinstance(cfg.sparsity, list):
        if len(cfg.sparsity) != n:
            raise ValueError(f"compress.sparsity lists {len(cfg.sparsity)} values for {n} decoder layers")
        return list(cfg.sparsity)
    if cfg.owl is None:
        return [float(cfg.sparsity)] * n
    if "owl" not in progress.extra:
        progress.extra["owl"] = owl_prepass(backend, model, cfg, plan)
    return progress.extra["owl"]


def _ffn_width(model: OffloadedModel, cfg: CompressConfig, sparsity: list[float]) -> int | None:
    """Structured methods with per-layer counts: the widest layer's kept neurons (others are padded)."""
    if cfg.cus_prun is None or not cfg.cus_prun.per_layer_counts:
        return None
    from raycompress.algorithms.cus_prun import kept_count

    d_ff = int(getattr(model.config, model.spec.intermediate_key))
    return max(kept_count(d_ff, s, cfg.cus_prun.multiple_of) for s in sparsity)


def _ignored(model: OffloadedModel, plans: list[Plan]) -> list[str]:
    """compressed-tensors `ignore` patterns (checkpoint module names) of the linears no plan
    compresses, then the modules never compressed (MoE routers, shared-expert gates)."""
    spec, out = model.spec, []
    for plan in plans:
        out += [checkpoint_module(spec, t) for t in plan.linears if t not in plan.targets]
    if spec.moe is not None:
        out += [checkpoint_module(spec, n) for n in spec.moe.never_compress]
    return [f"re:.*\\.{t.replace('.', '[.]')}$" for t in dict.fromkeys(out)]


def _config_updates(model: OffloadedModel, plans: list[Plan], cfg: CompressConfig, records: list[dict]) -> dict:
    """config.json changes: the quantization block, or the shrunk FFN width (and true per-layer counts)."""
    plan = plans[0]
    if plan.scheme is not None:  # linears left dense are listed as ignored, so loaders keep them dense
        return {"quantization_config": quantization_config(plan.scheme, ignore=["lm_head", *_ignored(model, plans)])}
    widths = [r["width"] for r in records if "width" in r]
    if not widths:
        return {}
    updates: dict = {model.spec.intermediate_key: max(widths)}
    if cfg.cus_prun is not None and cfg.cus_prun.per_layer_counts:
        updates["raycompress_ffn_neurons_kept"] = [r["neurons_kept"] for r in records if "width" in r]
    return updates


def _compress_one(backend: Backend, plan: Plan, layer_cfg: CompressConfig, i: int, width: int | None,
                  subsets: list[str], propagate: bool = True) -> dict[str, dict]:
    """Statistics, reduction to owners, solves and propagation of decoder layer i (not waited on
    except where a later call needs it). Returns what the records of routed experts' linears add
    (`_expert_facts`): module -> {"expert", "tokens", optional "fallback"}.

    Raises:
        engine.experts.ExpertStarved: `compress.moe.policy: refuse` and an expert below the threshold
            (before any solve).
    """
    ws, k = backend.workers, plan.k
    _all(backend, "begin_layer", i)
    counts = backend.get([w.accumulate(plan.stat_groups, plan.split, plan.extras, plan.kv, plan.all_tokens)
                          for w in ws])
    pending = backend.reduce(0, [extra_key(plan.kv, "kv")], []) if plan.kv else []  # the writer's
    if plan.structured:
        owner = i % k  # one structured solve per layer, owners take turns
        down = next(iter(plan.stat_groups))
        backend.get(backend.reduce(owner, plan.keys(down, subsets), [down]))
        solved = ws[owner].solve_layer(layer_cfg, width, k > 1)
        backend.get(pending + [w.apply(None if r == owner else solved) for r, w in enumerate(ws)])
        return {}
    facts, fallback = _expert_facts(plan, layer_cfg, i, counts)
    for g in plan.stat_groups:
        pending += backend.reduce(plan.owners[g], plan.keys(g, subsets), plan.stat_groups[g][1])
    for r, w in enumerate(ws):  # weights another worker solves are not needed here until apply
        pending.append(w.drop_modules([t for g, names in plan.groups.items() if plan.owners[g] != r
                                       and g not in plan.experts for t in names]))  # experts: fused, kept
    fb_cfg = fallback_config(layer_cfg) if fallback else layer_cfg
    solved = {g: ws[r].solve_group(g, plan.groups[g], fb_cfg if g in fallback else layer_cfg, k > 1)
              for r in range(k) for g in plan.solve_order(r)}
    backend.get(pending)
    backend.get([w.apply(*[h for g, h in solved.items() if plan.owners[g] != r], propagate=propagate)
                 for r, w in enumerate(ws)])
    return facts


def _expert_facts(plan: Plan, cfg: CompressConfig, i: int, counts: list[dict]):
    """Routed tokens per expert (summed over workers) and the low-token policy's decision
    (`engine.experts.low_token_plan`): (module -> record additions, groups solved by the fallback).
    Data-free methods (no expert statistics, no tokens counted) add nothing."""
    if not plan.experts & set(plan.stat_groups):
        return {}, set()
    spec, merged = plan.spec, {}
    for c in counts:
        for key, n in c.items():
            merged[key] = merged.get(key, 0) + n
    routed = expert_tokens(spec, merged)
    fall = low_token_plan(spec, cfg, i, routed, plan.n_experts)
    facts, groups = {}, set()
    for g in plan.experts:
        e = parse_expert(spec, g)[0]
        for name in plan.groups[g]:
            facts[name] = {"expert": e, "tokens": routed.get(e, 0)}
            if e in fall:
                facts[name]["fallback"] = fall[e]
                groups.add(g)
    if fall:
        log.warning("layer %d: %d experts below compress.moe.min_tokens_per_expert fall back to %s: %s", i,
                    len(fall), next(iter(fall.values()))["method"], sorted(fall))
    return facts, groups


def compress_layers(backend: Backend, model: OffloadedModel, cfg: CompressConfig, out_dir: str | Path,
                    fingerprint: str, subsets: list[str] | None = None,
                    on_layer: Callable[[int, int, dict], None] | None = None) -> list[dict]:
    """Compress every decoder layer of `model` into `out_dir/model`; returns per-module records.

    Args:
        out_dir: the stage's output folder, a local path or URI.
        subsets: names of the row subsets the workers hold (MixCal / Cus-Prun), in a fixed order;
            default: MixCal's "domain", "general" when the recipe mixes, else none.
        on_layer: called as `on_layer(layer index, number of layers, facts)` after each layer is
            durable (facts: seconds, bytes, sha256, modules, mean rel_error); a replayed layer
            reports seconds 0. The adapter records metrics with it.
    """
    k = len(backend.workers)
    kinds = layer_kinds(model)
    plans = {j: Plan(model, cfg, k, j) for j in kinds}
    plan = plans[kinds[0]]

    def plan_of(i: int) -> Plan:
        return plans[kinds[0]] if len(kinds) == 1 else next(
            p for p in plans.values() if p.moe == is_moe_layer(model.skeleton.get_submodule(model.layer_prefix(i)), model.spec))
    if subsets is None:
        subsets = (["domain", "general"] if cfg.mixcal is not None
                   else sorted(cfg.cus_prun.dimensions) if cfg.cus_prun is not None else [])
    ckpt = uri.join(out_dir, "model")
    total = model.num_layers + 1
    progress = Progress(uri.join(out_dir, "progress.json"), fingerprint)
    sparsity = layer_sparsities(backend, model, cfg, progress, plan)
    width = _ffn_width(model, cfg, sparsity)
    for i in tqdm(range(model.num_layers), desc=f"compress[{cfg.algorithm}]", unit="layer", disable=None):
        path = uri.join(ckpt, shard_name(i, total))
        if i in progress.done and uri.is_file(path):
            _all(backend, "replay_layer", i, path, plan.scheme)
            if on_layer:
                on_layer(i, model.num_layers, {**progress.layers[str(i)], "seconds": 0.0, "replayed": True})
            continue
        t0 = time.perf_counter()
        added = _compress_one(backend, plan_of(i), cfg.for_layer(sparsity[i]), i, width, subsets,
                              propagate=not all(p.data_free for p in plans.values()))
        shard = backend.get(backend.workers[0].write_layer(path, plan.scheme))
        records = [{**r, **added.get(r["module"], {})} for part in _all(backend, "pop_infos") for r in part]
        _all(backend, "end_layer")
        layer = {"seconds": time.perf_counter() - t0, **{k: shard[k] for k in ("sha256", "bytes", "keys")}}
        progress.mark(i, sorted(records, key=lambda r: r["module"]), layer)
        errors = [r["rel_error"] for r in records if r.get("rel_error") is not None]
        facts = {**layer, "modules": len(records), "rel_error": sum(errors) / len(errors) if errors else None}
        log.info("layer %d/%d done: seconds=%.1f modules=%d mean_rel_error=%s bytes=%d sha256=%s", i + 1,
                 model.num_layers, layer["seconds"], len(records),
                 "-" if facts["rel_error"] is None else f"{facts['rel_error']:.4g}", layer["bytes"], layer["sha256"][:12])
        if on_layer:
            on_layer(i, model.num_layers, facts)
    rest = shard_name(model.num_layers, total)
    outside = backend.get(backend.workers[0].write_outside_layers(uri.join(ckpt, rest)))
    written = {shard_name(int(i), total): m for i, m in progress.layers.items()}
    written[rest] = outside
    records = [r for i in range(model.num_layers) for r in progress.records.get(str(i), [])]
    finalize_checkpoint(ckpt, model.ref, [shard_name(i, total) for i in range(total)],
                        _config_updates(model, list(plans.values()), cfg, records), written)
    return records
