"""Analytic floors of one compression run: memory per worker, bytes moved and FLOPs per decoder
layer, from the model's shapes and the plan alone (no measurement). The benchmark and
`compression.json` put the measured figures next to them.

Memory floor of worker k, tensors only (the process's own start-up RSS is added by the caller):
    stats phase  = layer weights (checkpoint dtype) + every input group's statistics
                   (d_in² or d_in per key, accumulator dtype) + this shard's hidden states
                   (rows · seq · hidden, checkpoint dtype; propagated in place)
                   + one micro-batch's MLP activations (mb · seq · 3 · d_ff, checkpoint dtype)
                   + its largest input cast to float32 (mb · seq · max d_in · 4)
    solve phase  = layer weights + hidden states + max over the groups k owns, in solve order
                   (smallest d_in first, `Plan.solve_order`), of the statistics not yet solved
                   + that group's largest linear's float32 working copy, mask and new weight
                   (d_out · d_in · (4 + 1 + bytes(checkpoint dtype)))
    floor_k      = max(stats phase, solve phase)
Bytes moved per layer (K workers), the minimum for data-parallel statistics with one solver per
input group: Σ over statistics keys of (K − 1) · size(key) (each partial sent once toward its
owner) + (K − 1) · Σ over targets of d_out · d_in · bytes(checkpoint dtype) (every worker needs the
new weights to compute the next layer's inputs) + (K − 1) · Σ over targets of their quantization
parameters when quantized (`models.quantized.qparam_bytes` for the recipe's scheme: weight scales,
zero points, global scales and static input scales as they are written; they travel so) + for
smoothed groups (SmoothQuant, AWQ) (K − 1) · the rescaled norm's weight (d_in · bytes(checkpoint
dtype)). Activation statistics of the schemes ("absmax", "abssum": d_in values per group, and a KV
cache's 2 maxima per layer, accumulator dtype) count as statistics keys.
Mixture-of-experts layers (`Plan.moe`; E routed experts of intermediate I, top-k routing, hidden H):
every expert adds two statistics keys (gate/up: H² or H; down: I² or I, accumulator dtype), so the
statistics are E·(H² + I²)·bytes(accumulator) for Hessian methods, all on the worker in the stats
phase and spread over the owners (LPT by solve cost) in the solve phase; the layer weights include
the fused experts E·3·I·H·bytes(checkpoint dtype), held whole by every worker (a fused parameter
cannot be freed one expert at a time); a micro-batch's MLP activations are per routed (token,
expert) slot, mb·seq·k of them: the gathered input (H, checkpoint dtype), its float32 weighted
product and output (2·H·4), gate/up and act·up (3·I, checkpoint dtype) — transformers' grouped_mm
experts forward materialises all slots at once (torch profiler, transformers 5.25) — plus the
shared expert's MLP per token (3·I_shared); bytes moved add
(K − 1)·E·(H² + I²)·bytes(accumulator) of statistics and (K − 1)·E·3·I·H·bytes(checkpoint dtype)
(+ their quantization parameters) of new expert weights, by the same two sums above. FLOPs add
2·tokens·(H² + I²) per expert under the `all_tokens` policy, 2·k·tokens·(H² + I²)/E per expert on
average when routed (here counted as all tokens: an upper bound). `model_floors` takes, for a
model whose layers differ (an MoE model's dense-MLP layers), the largest figure over layer kinds.
FLOPs per layer: statistics 2 · tokens · d_in² per Hessian group (tokens · d_in for sqnorm), two
forward passes 2 · 2 · tokens · params, and the algorithm's solve FLOPs (`Algorithm.flops`).
"""
from __future__ import annotations

import torch

from raycompress.config import CompressConfig
from raycompress.engine.pipeline import Plan
from raycompress.models.quantized import qparam_bytes
from raycompress.models.weights import OffloadedModel


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def layer_floors(model: OffloadedModel, cfg: CompressConfig, plan: Plan, rows: list[int], seq: int,
                 micro_batch: int, n_subsets: int) -> dict:
    """{"memory_bytes_per_worker": [...], "bytes_moved_per_layer": int, "flops_per_layer": float}."""
    cb = _bytes(model.dtype)
    hb = _bytes(torch.float64 if cfg.hessian_dtype == "float64" else torch.float32)
    layer0 = model.skeleton.get_submodule(model.layer_prefix(plan.layer))
    params = sum(p.numel() for p in layer0.parameters())
    hidden = int(model.config.hidden_size)
    d_ff = int(getattr(model.config, model.spec.intermediate_key, 4 * hidden))
    act = 3 * d_ff * cb  # one token's MLP activations
    if plan.moe:  # per routed (token, expert) slot, as transformers' experts forward materialises them
        moe = model.spec.moe
        inter, top_k = int(getattr(model.config, moe.intermediate_key)), int(getattr(model.config, moe.top_k_key))
        shared = int(getattr(model.config, "shared_expert_intermediate_size", 0) or 0) if moe.shared_expert else 0
        act = top_k * (hidden * (cb + 8) + 3 * inter * cb) + 3 * shared * cb
    keys = max(1, n_subsets) if plan.split else 1
    d_in = {g: plan.d_in[g] for g in plan.stat_groups}
    numel = {g: d_in[g] ** 2 if kind == "hessian" else d_in[g] if kind else 0
             for g, (kind, _) in plan.stat_groups.items()}
    stat_bytes = {g: keys * hb * n + hb * d_in[g] * len(plan.extras.get(g, ())) for g, n in numel.items()}
    if plan.kv:
        stat_bytes[plan.kv] = 2 * hb
    d_max = max((s[1] for s in plan.shapes.values()), default=hidden)
    mem = []
    for k, n_rows in enumerate(rows):
        base = params * cb + n_rows * seq * hidden * cb
        stats_phase = base + sum(stat_bytes.values()) + micro_batch * seq * (act + d_max * 4)
        order = plan.solve_order(k)
        solve_phase = base + max((sum(stat_bytes.get(h, 0) for h in order[j:])
                                  + max(o * i * (5 + cb) for o, i in (plan.shapes[t] for t in plan.groups[g]))
                                  for j, g in enumerate(order)), default=0)
        mem.append(max(stats_phase, solve_phase))
    kk = len(rows)
    new_weights = sum(o * i * cb + (qparam_bytes(o, i, plan.scheme, model.dtype) if plan.scheme else 0)
                      for o, i in plan.shapes.values())
    if cfg.smoothquant is not None or cfg.algorithm == "awq":
        new_weights += sum(d_in[g] * cb for g in plan.groups if g in dict(model.spec.norm_before))
    moved = (kk - 1) * (sum(stat_bytes.values()) + new_weights)
    tokens = sum(rows) * seq
    flops = 4.0 * tokens * params + sum(2.0 * tokens * n for n in numel.values())
    if not plan.structured:
        flops += sum(plan.algo.flops([plan.shapes[t] for t in names]) for names in plan.groups.values())
    return {"memory_bytes_per_worker": mem, "bytes_moved_per_layer": moved, "flops_per_layer": flops}


def model_floors(model: OffloadedModel, cfg: CompressConfig, k: int, rows: list[int], seq: int, micro_batch: int,
                 n_subsets: int) -> dict:
    """`layer_floors` over every layer kind of the model (`engine.pipeline.layer_kinds`: an MoE
    model's sparse and dense-MLP layers), the largest of each figure (memory per worker elementwise)."""
    from raycompress.engine.pipeline import layer_kinds

    each = [layer_floors(model, cfg, Plan(model, cfg, k, i), rows, seq, micro_batch, n_subsets) for i in layer_kinds(model)]
    return {"memory_bytes_per_worker": [max(m) for m in zip(*(f["memory_bytes_per_worker"] for f in each))],
            "bytes_moved_per_layer": max(f["bytes_moved_per_layer"] for f in each),
            "flops_per_layer": max(f["flops_per_layer"] for f in each)}
