"""ZipCal: model-free calibration selection by greedy lexical (concept) coverage.

Source: ZipCal, github.com/FrancescoMonaco/ZipCal `source/similarity_check.py`,
`unique_tokens_sampling`: at each step draw a random candidate pool of at most 2,000 still-eligible
samples, pick the one that adds the most concepts not yet covered (ties: the larger total concept
count, then the earlier candidate), mark its concepts covered, repeat. Linear in the pool size per
step; no model is run.
"""
from __future__ import annotations

import numpy as np

from raycompress.registry import SELECTORS


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
    eligible = np.arange(len(sets))
    alive = np.ones(len(sets), dtype=bool)
    covered: set[int] = set()
    chosen: list[int] = []
    while len(chosen) < k and alive.any():
        idx = eligible[alive[eligible]]
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


@SELECTORS.register("zipcal")
def select_zipcal(concepts: list[np.ndarray], k: int, seed: int, pool: int = 2000) -> tuple[list[int], list[float]]:
    """Registry entry: (chosen indices, score = new concepts each added when chosen)."""
    rng = np.random.default_rng(seed)
    chosen = zipcal_greedy(concepts, k, rng, pool)
    covered: set[int] = set()
    scores = []
    for i in chosen:
        s = set(concepts[i].tolist())
        scores.append(float(len(s - covered)))
        covered |= s
    return chosen, scores
