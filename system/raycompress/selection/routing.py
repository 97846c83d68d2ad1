"""Routing-aware calibration selection for mixture-of-experts models: ZipCal's lexical coverage
plus coverage of the experts the candidate pool reaches (issue 22).

Lexical part (ZipCal, as in `selection/zipcal.py`; github.com/FrancescoMonaco/ZipCal
`source/similarity_check.py`, `unique_tokens_sampling`): at each greedy step a random pool of at
most `pool` still-eligible windows is drawn, and new(w) is the number of w's distinct concepts
not covered yet.

Routing part (ours): r[w, l, e] is the number of tokens window w routes to expert e at probed
layer l (a token counts once for each of its top-k experts; see `router_probe`). An expert (l, e)
is *reached* when the whole candidate pool routes at least one token to it. With m =
`min_tokens_per_expert` and covered[l, e] the tokens the windows chosen so far route to it,
need[l, e] = max(0, m - covered[l, e]) for reached experts and 0 for the others. Each step picks
the pool window maximising

    gain(w) = new(w) / max_{c in pool} new(c)  +  beta * sum_{l,e} min(need[l,e], r[w,l,e]) / sum need

(a term is 0 when its denominator is 0), ties broken by the larger total concept count (ZipCal's
rule), then the earlier window in pool order; it stops after k windows (the token budget is
k * seq_len). With beta = 0 the order is exactly ZipCal's. Greedy is a heuristic for this
multi-cover problem: a budget that could cover every expert may still leave some starved, so the
coverage is measured and reported (`RoutingCoverage`), never assumed. Deterministic given the seed.

Default beta = 16: when the budget is tight one window can meet only about 1/k of the total
need, so the routing term is O(1/k) while the lexical term spans [0, 1]; beta of the order of k
makes expert coverage lead and lexical coverage decide among windows that cover alike. On the
tiny random Qwen3-MoE of `jobs/benchmarks/routing_selection.py` (3,108 biomedical windows of 128
tokens), starved experts at k = 8 / m = 200 and k = 16 / m = 400 were 4 and 2 with beta = 0
(ZipCal's order), 2 and 2 with beta = 1, none with beta = 16, for 6% and 2% fewer concepts covered.

Registered as selection method "routing"; its model input is `ctx.extra["route_fn"]`
(windows -> (n, layers, experts) routed-token counts, e.g. `router_probe.RouterProbe`), with
`ctx.extra["min_tokens_per_expert"]` (default 16), `ctx.extra["beta"]` (default 16) and optionally
`ctx.extra["routing_prior"]` ((layers, experts) tokens already routed by another source's chosen
windows, so that with a domain/general mix the second source fills only what the first left). The
number of probed layers k is the probe's (`router_probe.load_probe(model_dir, probe_layers)`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from raycompress.registry import SELECTORS
from raycompress.selection.base import SelectContext, SelectionMethod, Window, stable_seed

DEFAULT_MIN_TOKENS = 16
DEFAULT_BETA = 16.0  # see the module docstring


def route_counts(expert_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """Routed-token counts per window, layer and expert.

    Args:
        expert_ids: (n, layers, tokens, top_k) integer expert ids chosen by each router.
        num_experts: experts per layer (ids must lie in [0, num_experts)).
    Returns:
        (n, layers, num_experts) int64 counts; each row of a layer sums to tokens * top_k.
    Raises:
        ValueError: not 4-D, or an id outside [0, num_experts).
    """
    ids = np.asarray(expert_ids)
    if ids.ndim != 4:
        raise ValueError(f"expert_ids must be (n, layers, tokens, top_k), got shape {ids.shape}")
    n, layers = ids.shape[:2]
    if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
        raise ValueError(f"expert ids must lie in [0, {num_experts}), got [{ids.min()}, {ids.max()}]")
    cell = (np.arange(n * layers, dtype=np.int64).reshape(n, layers, 1, 1) * num_experts + ids).ravel()
    return np.bincount(cell, minlength=n * layers * num_experts).reshape(n, layers, num_experts)


@dataclass
class RoutingCoverage:
    """Expert coverage of a chosen set. Arrays are (layers, experts): `tokens` int64 routed tokens
    (prior included), `reached` bool (the candidate pool routes >= 1 token there); `infeasible`
    holds the necessary conditions for every reached expert to get m tokens from k windows that
    fail: "pool_short" (layer, expert) pairs to which the whole pool routes fewer than m tokens,
    "budget_short" pairs to which even the expert's own k best windows route fewer than m, and
    "budget_short_layers" layers whose total need exceeds the routed slots of the k windows with
    the most tokens. None failing does not prove a cover exists (greedy may still starve)."""

    tokens: np.ndarray
    reached: np.ndarray
    min_tokens_per_expert: int
    infeasible: dict[str, list] = field(default_factory=dict)

    @property
    def starved(self) -> np.ndarray:
        """(layers, experts) bool: reached experts with fewer than m routed tokens."""
        return self.reached & (self.tokens < self.min_tokens_per_expert)

    def summary(self) -> dict:
        """JSON-ready figures: experts_reached, starved_experts, tokens_per_expert_min (over
        reached experts; None when none is reached), feasible (no necessary condition violated),
        infeasible, starved [[layer, expert], ...] and tokens per layer per expert."""
        reached = self.tokens[self.reached]
        return {
            "experts_reached": int(self.reached.sum()), "starved_experts": int(self.starved.sum()),
            "tokens_per_expert_min": int(reached.min()) if reached.size else None,
            "min_tokens_per_expert": self.min_tokens_per_expert,
            "feasible": not any(self.infeasible.values()),
            "infeasible": {k: [list(p) if isinstance(p, tuple) else p for p in v] for k, v in self.infeasible.items()},
            "starved": [[int(l), int(e)] for l, e in np.argwhere(self.starved)],
            "tokens": self.tokens.tolist(),
        }


def coverage_of(counts: np.ndarray, chosen: list[int], min_tokens_per_expert: int, k: int | None = None,
                prior: np.ndarray | None = None) -> RoutingCoverage:
    """Coverage of `chosen` among the pool `counts` ((n, layers, experts) routed tokens), with the
    necessary conditions for a budget of `k` windows (default len(chosen)) checked on the pool."""
    counts = np.asarray(counts, dtype=np.int64)
    k = len(chosen) if k is None else k
    base = np.zeros(counts.shape[1:], np.int64) if prior is None else np.asarray(prior, np.int64)
    tokens = base + counts[chosen].sum(0) if chosen else base.copy()
    reached = counts.sum(0) > 0
    want = reached & (base < min_tokens_per_expert)
    pool_short = want & (base + counts.sum(0) < min_tokens_per_expert)
    best_k = np.sort(counts, axis=0)[::-1][:k].sum(0) if k else np.zeros_like(base)
    budget_short = want & ~pool_short & (base + best_k < min_tokens_per_expert)
    need = np.where(want, np.minimum(min_tokens_per_expert, base + counts.sum(0)) - base, 0).sum(1)  # (layers,)
    slots = np.sort(counts.sum(2), axis=0)[::-1][:k].sum(0) if k else np.zeros(len(need), np.int64)
    infeasible: dict[str, list] = {r: [(int(l), int(e)) for l, e in np.argwhere(m)]
                                   for r, m in (("pool_short", pool_short), ("budget_short", budget_short))}
    infeasible["budget_short_layers"] = [int(l) for l in np.flatnonzero(need > slots)]
    return RoutingCoverage(tokens, reached, min_tokens_per_expert, infeasible)


def _new_concepts(flat: np.ndarray, owner: np.ndarray, covered: np.ndarray, n: int) -> np.ndarray:
    """(n,) float64 count of each window's concepts that are not covered yet."""
    return np.bincount(owner, weights=~covered[flat], minlength=n)


def routing_greedy(concepts: list[np.ndarray], counts: np.ndarray, k: int, rng: np.random.Generator, *,
                   min_tokens_per_expert: int = DEFAULT_MIN_TOKENS, beta: float = DEFAULT_BETA, pool: int = 2000,
                   prior: np.ndarray | None = None) -> tuple[list[int], list[float]]:
    """Greedy selection by the objective in the module docstring.

    Args:
        concepts: per window, an int array of its ZipCal concept ids.
        counts: (n, layers, experts) routed-token counts per window (`route_counts`).
        k: windows to choose (fewer if the pool runs out).
        rng: source of the random candidate pools (seeded by the caller).
        min_tokens_per_expert: m, the routed tokens every reached expert should get (>= 0).
        beta: weight of the routing term (>= 0; 0 gives ZipCal's order).
        pool: candidate pool size per step.
        prior: (layers, experts) tokens already routed by windows chosen elsewhere (another source).
    Returns:
        (chosen window indices in selection order, the gain of each when it was picked).
    Raises:
        ValueError: counts not (len(concepts), layers, experts), or a negative m or beta.
    """
    counts = np.asarray(counts, dtype=np.int64)
    n = len(concepts)
    if counts.ndim != 3 or counts.shape[0] != n:
        raise ValueError(f"counts must be ({n}, layers, experts), got shape {counts.shape}")
    if min_tokens_per_expert < 0 or beta < 0:
        raise ValueError(f"min_tokens_per_expert and beta must be >= 0, got {min_tokens_per_expert}, {beta}")
    sets = [np.unique(np.asarray(c, dtype=np.int64)) for c in concepts]
    flat = np.concatenate(sets) if n else np.zeros(0, np.int64)
    owner = np.repeat(np.arange(n), [len(s) for s in sets])
    totals = np.array([len(s) for s in sets], dtype=np.int64)
    covered = np.zeros(int(flat.max()) + 1 if flat.size else 0, dtype=bool)
    routed = counts.reshape(n, -1)
    reached = routed.sum(0) > 0
    got = np.zeros(routed.shape[1], np.int64) if prior is None else np.asarray(prior, np.int64).ravel().copy()
    alive = np.ones(n, dtype=bool)
    chosen: list[int] = []
    gains: list[float] = []
    while len(chosen) < k and alive.any():
        idx = np.flatnonzero(alive)
        cand = rng.choice(idx, pool, replace=False) if len(idx) > pool else idx
        new = _new_concepts(flat, owner, covered, n)[cand]
        lexical = new / new.max() if new.max() > 0 else np.zeros(len(cand))
        need = np.where(reached, np.maximum(0, min_tokens_per_expert - got), 0)
        route = np.minimum(routed[cand], need).sum(1) / need.sum() if need.sum() > 0 else np.zeros(len(cand))
        gain = lexical + beta * route
        top = np.flatnonzero(gain == gain.max())
        pick = top[np.argmax(totals[cand[top]])]  # argmax: the first of the largest totals
        best = int(cand[pick])
        chosen.append(best)
        gains.append(float(gain[pick]))
        alive[best] = False
        covered[sets[best]] = True
        got += routed[best]
    return chosen, gains


def _params(ctx: SelectContext) -> tuple:
    route_fn = ctx.extra.get("route_fn")
    if route_fn is None:
        raise ValueError("routing selection needs the model's router probe (ctx.extra['route_fn'], "
                         "e.g. raycompress.selection.router_probe.load_probe(model_dir, probe_layers))")
    return (route_fn, int(ctx.extra.get("min_tokens_per_expert", DEFAULT_MIN_TOKENS)),
            float(ctx.extra.get("beta", DEFAULT_BETA)))


def window_counts(windows: list[Window], ctx: SelectContext) -> np.ndarray:
    """(n, layers, experts) routed-token counts of `windows`, probed once per uid in this process
    (cached in ctx.extra["routing_counts"])."""
    route_fn = _params(ctx)[0]
    cache: dict = ctx.extra.setdefault("routing_counts", {})
    todo = [w for w in windows if w.uid not in cache]
    if todo:
        for w, c in zip(todo, np.asarray(route_fn([w.input_ids for w in todo]), dtype=np.int64)):
            cache[w.uid] = c
    return np.stack([cache[w.uid] for w in windows]) if windows else np.zeros((0, 0, 0), np.int64)


def _pick(windows: list[Window], k: int, ctx: SelectContext, rng: np.random.Generator, key: str) -> list[Window]:
    if not windows:
        return []
    _, m, beta = _params(ctx)
    counts = window_counts(windows, ctx)
    prior = ctx.extra.get("routing_prior")  # (layers, experts) tokens from windows chosen elsewhere
    chosen, gains = routing_greedy([w.concepts for w in windows], counts, k, rng, min_tokens_per_expert=m,
                                   beta=beta, pool=ctx.candidate_pool, prior=prior)
    ctx.extra.setdefault("routing_coverage", {})[key] = coverage_of(counts, chosen, m, k, prior)
    for i, g in zip(chosen, gains):
        windows[i].score = g
    return [windows[i] for i in chosen]


def local(windows: list[Window], k: int, ctx: SelectContext, shard_key: str = "") -> list[Window]:
    """Round 1 on one shard; the shard's coverage is left in ctx.extra["routing_coverage"][shard_key]."""
    return _pick(windows, k, ctx, np.random.default_rng(stable_seed(ctx.seed, shard_key)), shard_key)


def merge(windows: list[Window], k: int, ctx: SelectContext) -> list[Window]:
    """Round 2 on the union of shard winners (sorted by uid); "reached" is then judged on that
    union. Its coverage is left in ctx.extra["routing_coverage"]["merge"]."""
    ordered = sorted(windows, key=lambda w: w.uid)
    return _pick(ordered, k, ctx, np.random.default_rng(stable_seed(ctx.seed, "merge")), "merge")


SELECTORS.register("routing")(SelectionMethod(local, merge, frozenset({"router"}),
                                              "ZipCal unique_tokens_sampling + routed-expert coverage (ours)"))
