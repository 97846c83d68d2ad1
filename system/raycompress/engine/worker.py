"""One data-parallel compression worker: a shard of calibration activations and the current layer.

Lifecycle per decoder layer (each a method, called in this order by the pipeline):
    begin_layer(i)      load layer i's weights from safetensors (memory-mapped)
    accumulate(kinds)   run the dense layer on this shard with hooks -> partial InputStats
    solve(name, ...)    (owner only) sum partials, compress one linear, keep the result
    solve_layer(...)    (owner only, structured methods) shrink the FFN of the whole layer
    apply(names, Ws)    install compressed weights, run the layer -> next layer's inputs
    write_layer(...)    (writer only) persist the layer's tensors
    end_layer()         free the layer
This class knows nothing about Ray; `distributed.compress` wraps it in an actor.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn

from raycompress.config import CompressConfig
from raycompress.engine.stats import InputStats, mix_stats, sum_stats
from raycompress.models.checkpoint import write_shard
from raycompress.models.quantized import pack_quantized
from raycompress.models.weights import OffloadedModel
from raycompress.registry import ALGORITHMS

log = logging.getLogger(__name__)


class LayerWorker:
    """Holds hidden states (n, seq, hidden) for its calibration shard and one decoder layer.

    Args:
        model_dir: Hugging Face folder with safetensors weights.
        input_ids: (n, seq) int64 calibration token ids of this worker's shard.
        micro_batch: sequences per forward pass.
        subsets: named (n,) bool row masks whose statistics are kept apart (`engine.subsets`):
            MixCal's "domain"/"general", or Cus-Prun's dimensions; keys `<group>@<subset>`.
    """

    def __init__(self, model_dir: str, input_ids: torch.Tensor, micro_batch: int = 4, torch_threads: int | None = None,
                 subsets: dict[str, torch.Tensor] | None = None) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.model = OffloadedModel(model_dir)
        self.micro_batch = micro_batch
        self.layer: nn.Module | None = None
        self.layer_idx = -1
        self.infos: list[dict] = []
        self._qparams: dict[str, dict[str, torch.Tensor]] = {}
        self.subsets = {k: v.bool() for k, v in (subsets or {}).items()}
        self._rows = slice(0, 0)  # rows of the micro-batch being run
        self.timings: dict[str, float] = {}
        self._kwargs: list[dict] = []  # per micro-batch: what the model passes every decoder layer
        hidden = []
        for i in range(0, input_ids.shape[0], micro_batch):
            h, kw = self.model.layer_inputs(input_ids[i : i + micro_batch])
            hidden.append(h)
            self._kwargs.append(kw)
        self._embedded = torch.cat(hidden) if hidden else torch.zeros(0)  # (n, seq, hidden)
        self.hidden = self._embedded.clone()

    # -- helpers ---------------------------------------------------------------------------
    def _tick(self, key: str, t0: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - t0

    def _forward(self, h: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Run the current layer on h (b, seq, hidden) with the captured layer kwargs."""
        out = self.layer(h, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def _run_all(self) -> torch.Tensor:
        outs = []
        for j, i in enumerate(range(0, len(self.hidden), self.micro_batch)):
            self._rows = slice(i, i + self.micro_batch)
            outs.append(self._forward(self.hidden[self._rows], self._kwargs[j]))
        return torch.cat(outs) if outs else self.hidden

    def _hook(self, targets: dict[str | None, InputStats]):
        """Forward pre-hook adding a micro-batch's inputs x (b, seq, d_in) to the statistics of
        every subset its rows belong to (key None: all rows)."""
        def hook(module, args):
            x = args[0]
            for subset, st in targets.items():
                if subset is None:
                    st.add_batch(x)
                    continue
                m = self.subsets[subset][self._rows]  # (b,)
                if m.any():  # some layers (OPT) flatten to (b*seq, d_in): view as (b, seq, d_in)
                    st.add_batch(x.reshape(m.numel(), -1, x.shape[-1])[m])
        return hook

    # -- lifecycle -------------------------------------------------------------------------
    def begin_layer(self, idx: int) -> int:
        t0 = time.perf_counter()
        self.layer = self.model.load_layer(idx)
        self.layer_idx = idx
        self._tick("io", t0)
        return self.hidden.shape[0]

    @torch.no_grad()
    def accumulate(self, group_kinds: dict[str, str], split: bool = False) -> dict[str, InputStats]:
        """Partial statistics of this shard for each input group.

        Args:
            group_kinds: first module name of an input group -> stats kind ("hessian"/"sqnorm").
            split: statistics per row subset, under `<group>@<subset>`, instead of over all rows.
        Returns:
            group (or group@subset) name -> InputStats over this shard's tokens.
        """
        t0 = time.perf_counter()
        stats: dict[str, InputStats] = {}
        hooks = []
        for name, kind in group_kinds.items():
            lin = self.layer.get_submodule(name)
            keys = {f"{name}@{s}": s for s in self.subsets} if split else {name: None}
            targets = {}
            for key, subset in keys.items():
                stats[key] = targets[subset] = InputStats.empty(kind, lin.in_features)
            hooks.append(lin.register_forward_pre_hook(self._hook(targets)))
        try:
            if stats:
                self._run_all()
        finally:
            for hk in hooks:
                hk.remove()
        self._tick("stats", t0)
        return stats

    def solve(self, name: str, group: str, cfg: CompressConfig, *partials: dict[str, InputStats]) -> dict[str, torch.Tensor]:
        """Compress linear `name` of the current layer from the summed statistics of `group`.

        Returns the solver's tensors: "weight" (what the layer runs with) and, for quantized
        methods, "weight_scale" / "weight_zero_point"."""
        t0 = time.perf_counter()
        algo = ALGORITHMS.get(cfg.algorithm)
        stats = None
        if algo.stats and cfg.mixcal is not None:
            stats = mix_stats(sum_stats([p[f"{group}@domain"] for p in partials]),
                              sum_stats([p[f"{group}@general"] for p in partials]), cfg.mixcal.lam)
        elif algo.stats:
            stats = sum_stats([p[group] for p in partials])
        w = self.layer.get_submodule(name).weight.data
        tensors, info = algo.solve(w, stats, cfg)
        w_new = tensors["weight"]
        err = _reconstruction_error(w, w_new, stats)
        self.infos.append(
            {"layer": self.layer_idx, "module": name, "sparsity": float((w_new == 0).float().mean()),
             "rel_error": err, "seconds": time.perf_counter() - t0, **info}
        )
        self._tick("solve", t0)
        return tensors

    def solve_layer(self, cfg: CompressConfig, width: int | None, *partials: dict[str, InputStats]) -> dict[str, dict]:
        """Structured methods (Cus-Prun): shrink the current layer's FFN from the per-subset
        statistics of the down projection's input; `width` pads narrower layers (per-layer counts).

        Returns:
            module name -> {"weight", optional "bias"} for the up/gate and down projections.
        """
        t0 = time.perf_counter()
        spec = self.model.spec
        down = spec.mlp_down
        stats = {s: sum_stats([p[f"{down}@{s}"] for p in partials]) for s in self.subsets}
        up = {name: _tensors(self.layer.get_submodule(name)) for name in spec.mlp_up}
        solved, info = ALGORITHMS.get(cfg.algorithm).layer_solve(
            up, down, _tensors(self.layer.get_submodule(down)), stats, cfg, width)
        self.infos.append({"layer": self.layer_idx, "module": spec.mlp_down.rsplit(".", 1)[0],
                           "seconds": time.perf_counter() - t0, **info})
        self._tick("solve", t0)
        return solved

    @torch.no_grad()
    def apply(self, names: list[str], *solved: dict[str, torch.Tensor]) -> None:
        """Install compressed weights (and biases; shapes may shrink) and propagate this shard
        through the compressed layer."""
        t0 = time.perf_counter()
        self._qparams = {}
        for name, tensors in zip(names, solved):
            lin = self.layer.get_submodule(name)
            lin.weight = nn.Parameter(tensors["weight"].to(self.model.dtype), requires_grad=False)
            if "bias" in tensors:
                lin.bias = nn.Parameter(tensors["bias"].to(self.model.dtype), requires_grad=False)
            lin.out_features, lin.in_features = lin.weight.shape
            if "weight_scale" in tensors:
                self._qparams[name] = tensors
        self.hidden = self._run_all()
        self._tick("propagate", t0)

    def apply_solved(self, solved: dict[str, dict[str, torch.Tensor]]) -> None:
        """`apply` for a {module name: tensors} mapping (what `solve_layer` returns)."""
        self.apply(list(solved), *solved.values())

    @torch.no_grad()
    def outlier_counts(self, targets: list[str], group_of: dict[str, str], m: float, *partials) -> tuple[int, int]:
        """OWL: (outlier weights, weights) over `targets` of the current layer, from Wanda scores."""
        from raycompress.algorithms.owl import outlier_count
        from raycompress.algorithms.wanda import wanda_score

        out, total = 0, 0
        for t in targets:
            norms = sum_stats([p[group_of[t]] for p in partials]).value
            o, n = outlier_count(wanda_score(self.layer.get_submodule(t).weight.data, norms), m)
            out, total = out + o, total + n
        return out, total

    @torch.no_grad()
    def propagate_dense(self) -> None:
        """Run this shard through the current layer unchanged (OWL's dense pre-pass)."""
        self.hidden = self._run_all()

    def reset(self) -> None:
        """Back to the embeddings of the calibration shard (after a pre-pass)."""
        self.hidden = self._embedded.clone()

    def write_layer(self, path: str, quant=None) -> str:
        """Persist the current layer's tensors, with full checkpoint names, to `path` (atomic);
        quantized linears are packed (compressed-tensors pack-quantized) with `quant`."""
        t0 = time.perf_counter()
        prefix = self.model.layer_prefix(self.layer_idx)
        state = dict(self.layer.state_dict())
        for name, q in self._qparams.items():
            del state[f"{name}.weight"]
            state.update({f"{name}.{k}": v for k, v in pack_quantized(q, quant, self.model.dtype).items()})
        write_shard({f"{prefix}.{k}": v for k, v in state.items()}, Path(path))
        self._tick("io", t0)
        return path

    @torch.no_grad()
    def replay_layer(self, idx: int, shard: str, quant=None) -> None:
        """Resume: propagate this shard through layer `idx` as already written to `shard`."""
        t0 = time.perf_counter()
        self.layer = self.model.load_layer_from_shard(idx, Path(shard), quant)
        self.layer_idx = idx
        self.hidden = self._run_all()
        self.layer = None
        self._tick("replay", t0)

    def write_outside_layers(self, path: str) -> str:
        """Persist every tensor outside the decoder layers (embeddings, final norm, lm_head) unchanged."""
        t0 = time.perf_counter()
        write_shard(self.model.read_outside_layers(), Path(path))
        self._tick("io", t0)
        return path

    def end_layer(self) -> None:
        self.layer = None
        self._qparams = {}

    def pop_infos(self) -> list[dict]:
        infos, self.infos = self.infos, []
        return infos


def _tensors(lin: nn.Module) -> dict[str, torch.Tensor]:
    """{"weight": (d_out, d_in)} of a linear, with "bias": (d_out,) when it has one."""
    out = {"weight": lin.weight.data}
    if getattr(lin, "bias", None) is not None:
        out["bias"] = lin.bias.data
    return out


def _reconstruction_error(w: torch.Tensor, w_new: torch.Tensor, stats: InputStats | None) -> float | None:
    """Relative output error ||(W - Ŵ) X||_F² / ||W X||_F² from H = X X^T: tr(D H D^T) / tr(W H W^T)."""
    if stats is None or stats.kind != "hessian":
        return None
    h = stats.value.float()
    d = (w.float() - w_new.float())
    num = float((d @ h * d).sum())
    den = float((w.float() @ h * w.float()).sum())
    return num / den if den > 0 else None
