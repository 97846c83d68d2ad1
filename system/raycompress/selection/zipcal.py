"""ZipCal: model-free calibration selection by greedy lexical (concept) coverage.

Source: ZipCal, github.com/FrancescoMonaco/ZipCal `source/similarity_check.py`,
`unique_tokens_sampling`: at each step draw a random candidate pool of at most 2,000 still-eligible
samples, pick the one that adds the most concepts not yet covered (ties: the larger total concept
count, then the earlier candidate), mark its concepts covered, repeat. No model is run.

Distributed form (ours): round 1 runs the greedy on each shard (k winners per shard), round 2
runs it again on the union of the winners, sorted by uid so the result does not depend on
the number of workers.
"""
from __future__ import annotations

import numpy as np

from raycompress.registry import SELECTORS
from raycompress.selection.base import SelectContext, SelectionMethod, Window, stable_seed


def zipcal_greedy(concepts: list[np.ndarray], k: int, rng: np.random.Generator, pool: int = 2000) -> list[int]:
    """Indices of up to `k` samples chosen by greedy max-coverage of their concept sets.

    Args:
        concepts: per sample, an int array of its distinct concept ids.
        k: how many to select (fewer if the pool runs out).
        rng: source of the random candidate pools (seeded by the caller).
        pool: candidate pool size per step (the reference uses 2,000).
    Returns:
        selected sample indices in selection order.
    """
    sets = [frozenset(c.tolist()) for c in concepts]
    alive = np.ones(len(sets), dtype=bool)
    covered: set[int] = set()
    chosen: list[int] = []
    while len(chosen) < k and alive.any():
        idx = np.flatnonzero(alive)
        cand = rng.choice(idx, pool, replace=False) if len(idx) > pool else idx
        best, best_new, best_total = -1, -1, -1
        for i in cand.tolist():
            new = len(sets[i] - covered)
            total = len(sets[i])
            if new > best_new or (new == best_new and total > best_total):
                best, best_new, best_total = i, new, total
        chosen.append(best)
        alive[best] = False
        covered |= sets[best]
    return chosen


def coverage(concepts: list[np.ndarray], chosen: list[int]) -> int:
    """Number of distinct concepts covered by the chosen samples."""
    return len(set().union(*(set(concepts[i].tolist()) for i in chosen))) if chosen else 0


def _pick(windows: list[Window], k: int, rng: np.random.Generator, pool: int) -> list[Window]:
    chosen = zipcal_greedy([w.concepts for w in windows], k, rng, pool)
    covered: set[int] = set()
    out = []
    for i in chosen:
        s = set(windows[i].concepts.tolist())
        windows[i].score = float(len(s - covered))  # new concepts this window added
        covered |= s
        out.append(windows[i])
    return out


def local(windows: list[Window], k: int, ctx: SelectContext, shard_key: str = "") -> list[Window]:
    return _pick(windows, k, np.random.default_rng(stable_seed(ctx.seed, shard_key)), ctx.candidate_pool)


def merge(windows: list[Window], k: int, ctx: SelectContext) -> list[Window]:
    ordered = sorted(windows, key=lambda w: w.uid)
    return _pick(ordered, k, np.random.default_rng(stable_seed(ctx.seed, "merge")), ctx.candidate_pool)


SELECTORS.register("zipcal")(SelectionMethod(local, merge, source="ZipCal unique_tokens_sampling"))
