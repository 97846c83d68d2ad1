"""Random calibration selection: a seeded uniform sample without replacement (the usual baseline
of SparseGPT / Wanda / GPTQ, which draw random windows from C4)."""
from __future__ import annotations

import numpy as np

from raycompress.registry import SELECTORS


@SELECTORS.register("random")
def select_random(concepts: list[np.ndarray], k: int, seed: int, pool: int = 0) -> tuple[list[int], list[float]]:
    """(k indices drawn uniformly without replacement, score 0.0 each); `concepts` only sizes the pool."""
    rng = np.random.default_rng(seed)
    n = len(concepts)
    chosen = rng.choice(n, size=min(k, n), replace=False).tolist()
    return chosen, [0.0] * len(chosen)
