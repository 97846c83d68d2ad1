"""Routed experts of mixture-of-experts layers in the layer pipeline: their names, shapes, weights,
statistics from the tokens the router sends them, checkpoint names, and the low-token policy.

An expert e of an MoE decoder layer is compressed as two input groups (`models.moe.expert_groups`):
"<experts>.<e>.gate" (the linears "<experts>.<e>.gate" and "<experts>.<e>.up", which share the
routed tokens x_in (n_e, H)) and "<experts>.<e>.down" (input h_mid = act(gate x) * up x, (n_e, I)).
These names are statistics keys and record names; no module has them: the weights are views of the
fused parameters (`models.moe.expert_weights` / `set_expert_weights`). Each group is solved by one
owner like any input group, so a layer's E experts (2E groups) spread over every worker at once.

Weighting (the objective each statistic serves). The block's output is y = Σ_e w_e · down_e(h_e)
(w_e the router weight of token t for e, 0 for experts not chosen). Ignoring cross-expert terms,
the output error that expert e's down projection makes is Σ_t ||w_{t,e} (W − Ŵ) h_t||², i.e. the
layer-wise OBS/GPTQ objective (Frantar & Alistarh 2022/2023, eq. 1: ||(W − Ŵ) X||²) with X the
columns w_{t,e} · h_t: the down group adds w · h_mid, so its Hessian is Σ_t w_{t,e}² h hᵀ (router
weight squared). gate/up act before the nonlinearity and the weight; their layer-wise objective is
the unweighted one, Σ_t x xᵀ over the routed tokens (as GPTQ's per-linear objective; llm-compressor
and GPTQModel calibrate MoE experts on their routed tokens unweighted too). Activation statistics
for scheme scales ("absmax": the input the quantized linear really sees) are unweighted. With the
`all_tokens` policy every expert sees every token, most with router weight 0, so every statistic is
unweighted (the expert's function over the whole calibration distribution).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raycompress.models.arch import ArchSpec
from raycompress.models.quantized import resolve
from raycompress.models.moe import expert_groups, expert_weights, is_moe_layer, moe_spec, set_expert_weights

ROUTED = "#routed"  # suffix of the accumulate result key counting an expert's routed tokens


class ExpertStarved(ValueError):
    """An expert received fewer routed calibration tokens than `compress.moe.min_tokens_per_expert`
    with `compress.moe.policy: refuse`; the message names layer, expert and counts."""


def parse_expert(spec: ArchSpec, name: str) -> tuple[int, str] | None:
    """(e, role) for an expert linear or group name "<experts>.<e>.<role>", else None."""
    if spec.moe is None:
        return None
    prefix = spec.moe.path(spec.moe.experts) + "."
    if not name.startswith(prefix):
        return None
    e, _, role = name[len(prefix):].partition(".")
    return (int(e), role) if e.isdigit() and role in ("gate", "up", "down") else None


def layer_groups(layer: nn.Module, spec: ArchSpec) -> tuple[tuple[str, ...], ...]:
    """Every compressible linear of decoder `layer` (a live or meta module) grouped by shared input:
    `models.moe.layer_input_groups`, then each routed expert's groups (e increasing). Routers and
    shared-expert gates (`MoESpec.never_compress`) are in no group."""
    from raycompress.models.moe import layer_input_groups

    groups = layer_input_groups(layer, spec)
    if is_moe_layer(layer, spec):
        n = getattr(layer.get_submodule(moe_spec(spec).path(moe_spec(spec).experts)), moe_spec(spec).gate_up).shape[0]
        groups = groups + tuple(g for e in range(n) for g in expert_groups(spec, e))
    never = set(spec.moe.never_compress) if spec.moe is not None else set()
    return tuple(g for g in groups if not set(g) & never)


def weight(layer: nn.Module, spec: ArchSpec, name: str) -> torch.Tensor:
    """The weight (d_out, d_in) of linear `name`: a view into the fused experts for an expert."""
    ex = parse_expert(spec, name)
    if ex is None:
        return layer.get_submodule(name).weight.data
    return expert_weights(layer, spec, ex[0])[ex[1]]


def install(layer: nn.Module, spec: ArchSpec, name: str, w: torch.Tensor) -> bool:
    """Write expert linear `name`'s new weight into the fused parameter; False if not an expert."""
    ex = parse_expert(spec, name)
    if ex is None:
        return False
    set_expert_weights(layer, spec, ex[0], {ex[1]: w})
    return True


def checkpoint_module(spec: ArchSpec, name: str) -> str:
    """The checkpoint's module name (layer-relative) of linear `name`: an expert's per-expert Hub
    name (`MoESpec.checkpoint_experts` without ".weight"), others after `checkpoint_renames`."""
    ex = parse_expert(spec, name)
    if ex is not None:
        return dict(spec.moe.checkpoint_experts)[ex[1]].format(e=ex[0]).removesuffix(".weight")
    for old, new in (spec.moe.checkpoint_renames if spec.moe is not None else ()):
        if name.startswith(new):
            return old + name[len(new):]
    return name


class ExpertCollector:
    """The `models.moe.ExpertTap` callback adding each expert's routed inputs to its statistics.

    Args:
        layer, spec: the live decoder layer and its row.
        targets: expert group key -> {subset or None: [InputStats]} (None: all rows).
        weighted: ids of the statistics that take the router weight (the down group's algorithm
            statistics; see the module docstring).
        outputs: expert group key -> its linears: their ||W x||² (x as the statistic sees it) are
            added to the first statistic of each subset (the relative error's denominator).
        row_mask: subset -> (b,) bool mask of the current micro-batch's rows.
        seq: tokens per row (flattened token t belongs to row t // seq).
        all_tokens: every statistic unweighted (ExpertTap all_tokens).
    After the pass, `routed[e]` counts the tokens the router sent to e (weight > 0 under all_tokens).
    """

    def __init__(self, layer: nn.Module, spec: ArchSpec, targets: dict, weighted: set[int],
                 outputs: dict[str, list[str]], row_mask, seq: int, all_tokens: bool) -> None:
        self.layer, self.spec, self.targets, self.weighted = layer, spec, targets, weighted
        self.outputs, self.row_mask, self.seq, self.all_tokens = outputs, row_mask, seq, all_tokens
        self.routed: dict[int, int] = {}

    def __call__(self, e: int, x: torch.Tensor, h: torch.Tensor, w: torch.Tensor, tok: torch.Tensor) -> None:
        routed = int((w > 0).sum()) if self.all_tokens else int(w.numel())
        self.routed[e] = self.routed.get(e, 0) + routed
        (gate_key,), (down_key,) = ((g[0],) for g in expert_groups(self.spec, e))
        row = tok // self.seq
        for key, inp, can_weight in ((gate_key, x, False), (down_key, h, not self.all_tokens)):
            for subset, sts in self.targets.get(key, {}).items():
                sel = None if subset is None else self.row_mask(subset)[row]
                xs = inp if sel is None else inp[sel]
                if xs.shape[0] == 0:
                    continue
                ws = (w if sel is None else w[sel]).float()[:, None]
                xw = xs.float() * ws if can_weight else None
                for st in sts:
                    st.add_batch(xw if xw is not None and id(st) in self.weighted else xs)
                self._outputs(key, sts[0], xw if xw is not None and id(sts[0]) in self.weighted else xs)

    def _outputs(self, key: str, st, xs: torch.Tensor) -> None:
        for name in self.outputs.get(key, ()):
            y = F.linear(xs.to(weight(self.layer, self.spec, name).dtype), weight(self.layer, self.spec, name))
            st.add_output(name, float(torch.linalg.vector_norm(y, dtype=torch.float32)) ** 2)


def routed_key(spec: ArchSpec, e: int) -> str:
    """The accumulate result key counting expert e's routed tokens: "<experts>.<e>#routed"."""
    return f"{spec.moe.path(spec.moe.experts)}.{e}{ROUTED}"


def expert_tokens(spec: ArchSpec, counts: dict[str, int]) -> dict[int, int]:
    """expert -> routed tokens from (summed) accumulate results (`routed_key` entries)."""
    prefix = spec.moe.path(spec.moe.experts) + "."
    return {int(k[len(prefix):-len(ROUTED)]): n for k, n in counts.items() if k.endswith(ROUTED) and k.startswith(prefix)}


def low_token_plan(spec: ArchSpec, cfg, layer_idx: int, routed: dict[int, int], n_experts: int) -> dict[int, dict]:
    """The policy's decision for each starved expert: {e: {"tokens", "method", "reason"}} of the
    experts solved by the fallback method (empty under all_tokens, which calibrates every expert).
    Starved: fewer routed tokens than `compress.moe.min_tokens_per_expert`, and always none at all.

    Raises:
        ExpertStarved: policy refuse and some expert below the threshold (the first is named); policy
            fallback, an expert with no token, and a scheme with static input scales (FP8, NVFP4:
            an input scale needs observed inputs).
    """
    moe = cfg.moe
    min_tok, policy = (moe.min_tokens_per_expert, moe.policy) if moe is not None else (1, "fallback")
    need = max(1, min_tok)  # an expert without a token has no statistics: it is never solved from them
    starved = {e: routed.get(e, 0) for e in range(n_experts) if routed.get(e, 0) < need}
    if not starved or policy == "all_tokens":
        return {}
    if policy == "refuse":
        e, n = next(iter(starved.items()))
        raise ExpertStarved(f"layer {layer_idx} expert {e} ({spec.moe.path(spec.moe.experts)}.{e}): {n} routed "
                            f"calibration tokens < compress.moe.min_tokens_per_expert={min_tok} with policy refuse "
                            f"({len(starved)} experts starved: {sorted(starved)}); use policy all_tokens or fallback, "
                            "or a calibration set that reaches them")
    silent = [e for e, n in starved.items() if n == 0]
    if silent and getattr(resolve(cfg), "static_inputs", False):
        raise ExpertStarved(f"layer {layer_idx} expert {silent[0]} ({spec.moe.path(spec.moe.experts)}.{silent[0]}): no "
                            f"routed calibration token, and scheme {cfg.scheme} stores a calibrated input scale per "
                            "linear, which no data-free method gives; use compress.moe.policy all_tokens")
    method = fallback_method(cfg)
    return {e: {"tokens": n, "method": method, "reason": f"{n} routed tokens < min_tokens_per_expert={min_tok}"
                if n >= 1 or min_tok >= 1 else "no routed token (no statistics)"} for e, n in starved.items()}


def fallback_method(cfg) -> str:
    """The data-free method an expert falls back to: rtn for quantized recipes, magnitude otherwise."""
    return "rtn" if cfg.quantized else "magnitude"


def fallback_config(cfg):
    """`cfg` with the fallback method as its algorithm (smoothing and AWQ's grid dropped)."""
    return cfg.model_copy(update={"algorithm": fallback_method(cfg), "awq": None, "smoothquant": None})
