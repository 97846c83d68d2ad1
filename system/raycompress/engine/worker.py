"""One data-parallel compression worker: a shard of calibration activations and the current layer,
on the device it was given (a GPU Ray assigned, or the CPU).

Memory lifecycle per decoder layer (each a method, called in this order by the pipeline):
    begin_layer(i)          load layer i from safetensors to the device, in the checkpoint's dtype
    accumulate(kinds)       run the dense layer on this shard with hooks; statistics stay here
    export_stats(keys)      (non-owners) hand a group's partial statistics on, and free them
    reduce_stats(keys, p)   (owners) add a partial received from another worker, in place
    drop_modules(names)     free the weights of linears another worker solves
    solve_group(g, names)   (owner) compress a group's linears; the Hessian becomes their factor
    solve_layer(...)        (owner, structured methods) shrink the FFN of the whole layer
    apply(solved)           install compressed weights, run the layer in place -> next inputs
    write_layer(path)       (writer) NaN check, persist, SHA-256 from the bytes in memory
    end_layer()             free the layer
This class knows nothing about Ray; `distributed.compress` wraps it in an actor.
"""
from __future__ import annotations

import contextlib
import logging
import time

import torch
from torch import nn

from raycompress.algorithms.obs import HessianNotPositiveDefinite
from raycompress.config import CompressConfig
from raycompress.engine.experts import ExpertCollector, routed_key, checkpoint_module, install, parse_expert, weight
from raycompress.engine.memory import PeakMemory
from raycompress.engine.stats import InputStats, mix_stats, require_finite
from raycompress.engine.transfer import cpu_tensors, nbytes, to_device
from raycompress.models.checkpoint import write_shard
from raycompress.models.moe import ExpertTap, is_moe_layer, to_checkpoint
from raycompress.engine.smoothing import extra_key, smooth_group
from raycompress.models.quantized import input_qparams, kv_qparams, pack, resolve
from raycompress.models.weights import OffloadedModel
from raycompress.registry import ALGORITHMS

log = logging.getLogger(__name__)


class SolveError(RuntimeError):
    """A solver failed on one module; the message names the layer, module and dampings tried."""


class LayerWorker:
    """Holds hidden states (n, seq, hidden) for its calibration shard and one decoder layer.

    Args:
        model_dir: the model: a `models.fetch.ModelRef`, or a local folder or URI of a Hugging Face
            folder with safetensors weights (remote files are read through this node's cache).
        input_ids: (n, seq) int64 calibration token ids of this worker's shard; the shard must start
            at a multiple of `micro_batch` in the calibration set (see `engine.shards`).
        micro_batch: sequences per forward pass.
        subsets: named (n,) bool row masks whose statistics are kept apart (`engine.subsets`):
            MixCal's "domain"/"general", or Cus-Prun's dimensions; keys `<group>@<subset>`.
        device: where weights, activations, statistics and solves live (default CPU).
        hessian_dtype: accumulator dtype of the statistics (float32 or float64).
        rank: this worker's index among the data-parallel workers.

    Raises (constructor):
        models.validate.CheckpointError: the model folder is refused, or an embedding weight
            holds NaN/Inf (named with its file and count), found as the embeddings are loaded.
    """

    def __init__(self, model_dir, input_ids: torch.Tensor, micro_batch: int = 4, torch_threads: int | None = None,
                 subsets: dict[str, torch.Tensor] | None = None, device: str | torch.device = "cpu",
                 hessian_dtype: torch.dtype = torch.float32, rank: int = 0) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.memory = PeakMemory()
        self.baseline_rss = self.memory.private()
        self.device = torch.device(device)
        self.model = OffloadedModel(model_dir, device=self.device)
        self.micro_batch, self.hessian_dtype, self.rank = micro_batch, hessian_dtype, rank
        self.input_ids = input_ids
        self.layer: nn.Module | None = None
        self.layer_idx = -1
        self.infos: list[dict] = []
        self.stats: dict[str, InputStats] = {}
        self._qparams: dict[str, dict[str, torch.Tensor]] = {}
        self.subsets = {k: v.bool().to(self.device) for k, v in (subsets or {}).items()}
        self._rows = slice(0, 0)  # rows of the micro-batch being run
        self.timings: dict[str, float] = dict.fromkeys(("stats", "reduce", "solve", "propagate", "io", "replay"), 0.0)
        self.bytes_in: dict[int, int] = {}  # layer -> bytes received from other workers
        self.hidden, self._kwargs = self._embed()

    # -- helpers ---------------------------------------------------------------------------
    def _tick(self, key: str, t0: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - t0

    def _count_in(self, n: int) -> None:
        self.bytes_in[self.layer_idx] = self.bytes_in.get(self.layer_idx, 0) + n

    def _embed(self) -> tuple[torch.Tensor, list[dict]]:
        """Layer-0 inputs (n, seq, hidden) of the shard in one buffer, and per micro-batch kwargs;
        the embedding table is freed afterwards."""
        hidden, kwargs = None, []
        n = self.input_ids.shape[0]
        for i in range(0, n, self.micro_batch):
            h, kw = self.model.layer_inputs(self.input_ids[i : i + self.micro_batch])
            if hidden is None:
                hidden = torch.empty((n, *h.shape[1:]), dtype=h.dtype, device=self.device)
            hidden[i : i + h.shape[0]] = h
            kwargs.append(kw)
        self.model.release_inputs()
        return (hidden if hidden is not None else torch.zeros(0, device=self.device)), kwargs

    def _forward(self, h: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Run the current layer on h (b, seq, hidden) with the captured layer kwargs."""
        out = self.layer(h, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def _run_all(self, keep: bool) -> None:
        """Run every micro-batch through the layer; with `keep`, outputs overwrite the inputs in place."""
        for j, i in enumerate(range(0, len(self.hidden), self.micro_batch)):
            self._rows = slice(i, i + self.micro_batch)
            out = self._forward(self.hidden[self._rows], self._kwargs[j])
            if keep:
                self.hidden[self._rows] = out.reshape(self.hidden[self._rows].shape)

    def _hooks(self, name: str, targets: dict[str | None, list[InputStats]], inputs: bool) -> list:
        """Hooks adding a micro-batch's inputs x (b, seq, d_in) to the statistics of every subset its
        rows belong to (key None: all rows), and its output norms ||W x||² to each subset's first."""
        def rows(t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:  # OPT flattens to (b*seq, d)
            return t.reshape(m.numel(), -1, t.shape[-1])[m]

        def pre(module, args):
            for subset, sts in targets.items():
                m = None if subset is None else self.subsets[subset][self._rows]
                if m is None or m.any():
                    for st in sts:
                        st.add_batch(args[0] if m is None else rows(args[0], m))

        def post(module, args, out):
            y = out if getattr(module, "bias", None) is None else out - module.bias
            for subset, sts in targets.items():
                m = None if subset is None else self.subsets[subset][self._rows]
                if m is None or m.any():
                    norm = torch.linalg.vector_norm(y if m is None else rows(y, m), dtype=torch.float32)
                    sts[0].add_output(name, float(norm) ** 2)  # no float32 copy of the output

        lin = self.layer.get_submodule(name)
        return [lin.register_forward_pre_hook(pre)] if inputs else [lin.register_forward_hook(post)]

    # -- lifecycle -------------------------------------------------------------------------
    def begin_layer(self, idx: int) -> int:
        """Load decoder layer `idx`; returns this shard's row count. Every weight is checked for
        NaN/Inf as it is loaded (`OffloadedModel.read_tensors`, no second read).

        Raises:
            models.validate.CheckpointError: a weight holds NaN/Inf (its name, file and count), or
                its file is missing or malformed. Deterministic: a retry fails the same way.
        """
        t0 = time.perf_counter()
        self.layer = self.model.load_layer(idx)
        self.layer_idx = idx
        self._tick("io", t0)
        return self.hidden.shape[0]

    @torch.no_grad()
    def accumulate(self, groups: dict[str, tuple[str | None, list[str]]], split: bool = False,
                   extras: dict[str, tuple[str, ...]] | None = None, kv: str | None = None,
                   all_tokens: bool = False) -> dict[str, int]:
        """Partial statistics of this shard for each input group, kept on this worker.

        Args:
            groups: group name -> (the algorithm's stats kind "hessian"/"sqnorm", or None; linears
                reading that input). A routed expert's groups (`engine.experts`) take their
                statistics from the tokens the router sends that expert (`models.moe.ExpertTap`;
                the down group weighted by the router weight, see `engine.experts`).
            split: the algorithm's statistics per row subset, under `<group>@<subset>`, instead of
                over all rows.
            extras: group -> activation statistics kinds ("absmax", "abssum") over all rows, under
                `engine.smoothing.extra_key(group, kind)`.
            kv: the attention module whose key / value states' max |k|, max |v| are observed
                (an "absmax" statistic of 2 values under `extra_key(kv, "kv")`), or None.
            all_tokens: experts' statistics from every token (`compress.moe.policy: all_tokens`).
        Returns:
            statistics key -> tokens accumulated; for an MoE layer also "<experts>.<e>#routed" ->
            tokens the router sent expert e (every expert, 0 included).
        """
        t0 = time.perf_counter()
        hooks, extras, spec = [], extras or {}, self.model.spec
        expert_targets, weighted, outputs = {}, set(), {}
        for group, (kind, names) in groups.items():
            expert = parse_expert(spec, group) is not None
            d_in = weight(self.layer, spec, group).shape[1]
            targets: dict[str | None, list[InputStats]] = {}
            keys = ({f"{group}@{s}": s for s in self.subsets} if split else {group: None}) if kind else {}
            for key, subset in keys.items():
                self.stats[key] = InputStats.empty(kind, d_in, self.hessian_dtype, self.device)
                targets.setdefault(subset, []).append(self.stats[key])
                weighted.add(id(self.stats[key]))
            for ek in extras.get(group, ()):
                self.stats[extra_key(group, ek)] = InputStats.empty(ek, d_in, self.hessian_dtype, self.device)
                targets.setdefault(None, []).append(self.stats[extra_key(group, ek)])
            if expert:
                expert_targets[group], outputs[group] = targets, list(names) if kind else []
                continue
            hooks += self._hooks(group, targets, inputs=True)  # the shared input, once
            for name in names:  # every target linear's output norm
                hooks += self._hooks(name, targets, inputs=False)
        collector = None
        try:
            with contextlib.ExitStack() as stack:
                if expert_targets:
                    collector = ExpertCollector(self.layer, spec, expert_targets, weighted, outputs,
                                                lambda s: self.subsets[s][self._rows], self.hidden.shape[1], all_tokens)
                    stack.enter_context(ExpertTap(self.layer, spec, collector, with_tokens=True, all_tokens=all_tokens))
                if kv is not None:
                    self._observe_kv(kv)
                elif groups:
                    self._run_all(keep=False)
        finally:
            for hk in hooks:
                hk.remove()
        self._tick("stats", t0)
        counts = {k: s.tokens for k, s in self.stats.items()}
        if collector is not None:
            n = getattr(self.layer.get_submodule(spec.moe.path(spec.moe.experts)), spec.moe.gate_up).shape[0]
            counts.update({routed_key(spec, e): collector.routed.get(e, 0) for e in range(n)})
        return counts

    def _observe_kv(self, attn: str) -> None:
        """Run every micro-batch with the KV observer on `attn` (`engine.kv.KVObserver`)."""
        from raycompress.engine.kv import KVObserver

        with KVObserver(self.layer.get_submodule(attn)) as obs:
            self._run_all(keep=False)
        st = InputStats.empty("absmax", 2, self.hessian_dtype, self.device)
        for i, m in enumerate((obs.k_absmax, obs.v_absmax)):
            if m is not None:
                st._buffer()[i] = m.to(st.dtype)
        st.tokens = self.hidden.shape[0] * (self.hidden.shape[1] if self.hidden.dim() > 1 else 0)
        self.stats[extra_key(attn, "kv")] = st

    def export_stats(self, keys: list[str]) -> dict[str, InputStats]:
        """Hand this worker's partial statistics `keys` on (on the CPU) and free them here."""
        t0 = time.perf_counter()
        out = {k: self.stats.pop(k).to("cpu") for k in keys}
        self._tick("reduce", t0)
        return out

    def reduce_stats(self, partial: dict[str, InputStats]) -> None:
        """Add partial statistics received from another worker into this worker's, in place."""
        t0 = time.perf_counter()
        for key, st in partial.items():
            self._count_in(st.nbytes)
            self.stats[key].add_(st)
        self._tick("reduce", t0)

    def drop_modules(self, names: list[str]) -> None:
        """Free the weights of linears another worker solves (their new weights arrive in `apply`)."""
        for name in names:
            lin = self.layer.get_submodule(name)
            lin.weight = nn.Parameter(torch.empty(lin.weight.shape, dtype=lin.weight.dtype, device="meta"),
                                      requires_grad=False)

    def _group_stats(self, group: str, cfg: CompressConfig) -> InputStats | None:
        algo = ALGORITHMS.get(cfg.algorithm)
        if not algo.stats:
            return None
        if cfg.mixcal is not None:
            return mix_stats(self.stats.pop(f"{group}@domain"), self.stats.pop(f"{group}@general"), cfg.mixcal.lam)
        return self.stats.pop(group)

    @torch.no_grad()
    def solve_group(self, group: str, names: list[str], cfg: CompressConfig, export: bool) -> dict | None:
        """Compress the linears `names` of input group `group` from its fully reduced statistics;
        the new weights replace the old ones here.

        Returns:
            {name: tensors on the CPU} for the other workers when `export`, else None.
        Raises:
            SolveError: the solver failed (names layer, module and the dampings tried).
        """
        t0 = time.perf_counter()
        algo = ALGORITHMS.get(cfg.algorithm)
        stats = self._group_stats(group, cfg)
        extra = {k.split("#", 1)[1]: self.stats.pop(k) for k in list(self.stats) if k.startswith(group + "#")}
        scheme = resolve(cfg)
        try:
            require_finite([stats, *extra.values()])
            smoothed, sinfo = smooth_group(self.layer, group, names, self.model.spec, cfg, scheme, stats, extra)
            inputs = input_qparams(extra["absmax"].value, scheme, self.model.dtype) if "absmax" in extra and \
                scheme.static_inputs else {}
            exported = {n: cpu_tensors(t) for n, t in smoothed.items()}
            ctx = algo.prepare(stats, cfg)  # e.g. the OBS factor, shared by the group's linears
            out_sq = dict(stats.out_sq) if stats is not None else {}  # per token, as the loss
            for name in names:
                t1 = time.perf_counter()
                tensors, info = algo.solve(weight(self.layer, self.model.spec, name), ctx, cfg)
                tensors.update({k: v.clone() for k, v in inputs.items()})  # one tensor per linear
                info.update(sinfo)
                self._install(name, tensors)  # the old weight is freed here
                loss = info.pop("loss", None)
                self.infos.append({"layer": self.layer_idx, "module": name,
                                   "sparsity": _zero_share(tensors["weight"]),
                                   "rel_error": loss / out_sq[name] if loss is not None and out_sq.get(name) else None,
                                   "seconds": time.perf_counter() - t1, **info})
                if export:
                    exported[name] = cpu_tensors(tensors)
        except (HessianNotPositiveDefinite, ValueError) as exc:
            if isinstance(exc, SolveError):
                raise
            raise SolveError(f"layer {self.layer_idx} module {group} ({', '.join(names)}): {exc} "
                             f"(compress.damping={cfg.damping})") from exc
        for rec in self.infos[-len(names):]:  # the whole group's time, factor included
            rec["group_seconds"] = time.perf_counter() - t0
        del stats
        self._tick("solve", t0)
        return exported if export else None

    def solve_layer(self, cfg: CompressConfig, width: int | None, export: bool) -> dict | None:
        """Structured methods (Cus-Prun): shrink the current layer's FFN from the per-subset
        statistics of the down projection's input (reduced here); `width` pads narrower layers.

        Returns:
            module name -> {"weight", optional "bias"} (CPU) for the other workers when `export`.
        """
        t0 = time.perf_counter()
        spec = self.model.spec
        down = spec.mlp_down
        stats = {s: self.stats.pop(f"{down}@{s}") for s in self.subsets}
        up = {name: _tensors(self.layer.get_submodule(name)) for name in spec.mlp_up}
        solved, info = ALGORITHMS.get(cfg.algorithm).layer_solve(
            up, down, _tensors(self.layer.get_submodule(down)), stats, cfg, width)
        self.infos.append({"layer": self.layer_idx, "module": spec.mlp_down.rsplit(".", 1)[0],
                           "seconds": time.perf_counter() - t0, **info})
        for name, tensors in solved.items():
            self._install(name, tensors)
        self._tick("solve", t0)
        return {n: cpu_tensors(t) for n, t in solved.items()} if export else None

    def _install(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """New weights of module `name` (a linear, or a norm a smoothing step rescaled)."""
        if "weight_scale" in tensors:
            self._qparams[name] = {k: v for k, v in tensors.items() if k != "weight"}
        if install(self.layer, self.model.spec, name, tensors["weight"]):  # a routed expert's view
            return
        lin = self.layer.get_submodule(name)
        lin.weight = nn.Parameter(tensors["weight"].to(self.device, self.model.dtype), requires_grad=False)
        if "bias" in tensors:
            lin.bias = nn.Parameter(tensors["bias"].to(self.device, self.model.dtype), requires_grad=False)
        if lin.weight.dim() == 2:
            lin.out_features, lin.in_features = lin.weight.shape

    @torch.no_grad()
    def apply(self, *solved: dict[str, dict[str, torch.Tensor]] | None, propagate: bool = True) -> None:
        """Install compressed weights received from their owners (None: solved here) and
        propagate this shard through the compressed layer, in place (not when no layer of the
        recipe looks at its inputs: `Plan.data_free`)."""
        t0 = time.perf_counter()
        for part in solved:
            for name, tensors in (part or {}).items():
                self._count_in(sum(nbytes(t) for t in tensors.values()))
                self._install(name, to_device(tensors, self.device))
        if propagate:
            self._run_all(keep=True)
        self._tick("propagate", t0)

    @torch.no_grad()
    def outlier_counts(self, targets: list[str], group_of: dict[str, str], m: float) -> tuple[int, int]:
        """OWL: (outlier weights, weights) over `targets` of the current layer, from the reduced
        Wanda statistics held here."""
        from raycompress.algorithms.owl import outlier_count
        from raycompress.algorithms.wanda import wanda_score

        out, total = 0, 0
        for t in targets:
            norms = self.stats[group_of[t]].value
            o, n = outlier_count(wanda_score(self.layer.get_submodule(t).weight.data, norms), m)
            out, total = out + o, total + n
        return out, total

    @torch.no_grad()
    def propagate_dense(self) -> None:
        """Run this shard through the current layer unchanged (OWL's dense pre-pass)."""
        self.stats = {}
        self._run_all(keep=True)

    def reset(self) -> None:
        """Back to the embeddings of the calibration shard (after a pre-pass)."""
        self.hidden, self._kwargs = self._embed()

    def write_layer(self, path: str, scheme=None) -> dict:
        """Persist the current layer's tensors, with full checkpoint names, at `path` (a local path
        or URI; atomic); quantized linears are packed in `scheme`'s compressed-tensors format
        (`models.quantized.Scheme`), and a KV cache's k_scale / v_scale come from the reduced
        observer statistics this worker holds.

        Returns:
            {"path", "sha256", "bytes", "keys"} of the shard written.
        Raises:
            ValueError: a tensor holds NaN or Inf (named; nothing is written).
        """
        t0 = time.perf_counter()
        prefix = self.model.layer_prefix(self.layer_idx)
        spec = self.model.spec
        state = {k: v.to("cpu") for k, v in self.layer.state_dict().items()}
        if spec.moe is not None:  # fused experts back to the Hub's per-expert tensors
            state = to_checkpoint(state, spec)
        for name, q in self._qparams.items():
            name = checkpoint_module(spec, name)
            q = {"weight": state.pop(f"{name}.weight"), **{k: v.to("cpu") for k, v in q.items()}}
            state.update({f"{name}.{k}": v for k, v in pack(q, scheme, self.model.dtype).items()})
        attn = spec.attention
        kv = self.stats.get(extra_key(attn, "kv"))
        if scheme is not None and scheme.kv is not None and kv is not None:
            try:
                require_finite([kv])
            except ValueError as exc:
                raise SolveError(f"layer {self.layer_idx} module {attn} (KV cache): {exc}") from exc
            k_max, v_max = kv.value.float().tolist()
            state.update({f"{attn}.{k}": v.to("cpu") for k, v in kv_qparams(k_max, v_max, scheme, self.model.dtype).items()})
        out = write_shard({f"{prefix}.{k}": v for k, v in state.items()}, path)
        self._tick("io", t0)
        return out

    @torch.no_grad()
    def replay_layer(self, idx: int, shard: str, scheme=None) -> None:
        """Resume: propagate this shard through layer `idx` as already written at `shard` (local or URI)."""
        t0 = time.perf_counter()
        self.layer = self.model.load_layer_from_shard(idx, shard, scheme)
        self.layer_idx = idx
        self._run_all(keep=True)
        self.layer = None
        self._tick("replay", t0)

    def write_outside_layers(self, path: str) -> dict:
        """Persist every tensor outside the decoder layers (embeddings, final norm, lm_head) unchanged."""
        t0 = time.perf_counter()
        out = write_shard(self.model.read_outside_layers(), path)
        self._tick("io", t0)
        return out

    def end_layer(self) -> None:
        self.layer = None
        self.stats, self._qparams = {}, {}

    def pop_infos(self) -> list[dict]:
        infos, self.infos = self.infos, []
        return infos

    def report(self) -> dict:
        """Timings (s), bytes received per layer, memory (bytes): peak private RSS (this worker's own
        pages), peak RSS as the kernel counts it (with the object-store pages it touched), private
        RSS at start-up; device."""
        peak_gpu = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        return {"timings": dict(self.timings), "bytes_in": dict(self.bytes_in), "peak_rss": self.memory.peak_rss(),
                "peak_private_rss": self.memory.peak_private, "baseline_rss": self.baseline_rss,
                "peak_gpu": peak_gpu, "device": str(self.device)}


def _zero_share(w: torch.Tensor) -> float:
    """Fraction of exact zeros in w, without a float copy of w."""
    return 1.0 - int(torch.count_nonzero(w)) / max(1, w.numel())


def _tensors(lin: nn.Module) -> dict[str, torch.Tensor]:
    """{"weight": (d_out, d_in)} of a linear, with "bias": (d_out,) when it has one."""
    out = {"weight": lin.weight.data}
    if getattr(lin, "bias", None) is not None:
        out["bias"] = lin.bias.data
    return out
