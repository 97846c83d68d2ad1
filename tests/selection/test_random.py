"""selection.random_select: seeded uniform sampling."""
import numpy as np

from raycompress.registry import SELECTORS
from raycompress.selection.random_select import select_random


def test_random_deterministic_with_seed():
    concepts = [np.array([i]) for i in range(50)]
    a, sa = select_random(concepts, 10, seed=7)
    b, _ = select_random(concepts, 10, seed=7)
    c, _ = select_random(concepts, 10, seed=8)
    assert a == b and a != c
    assert len(set(a)) == 10 and all(0 <= i < 50 for i in a)
    assert sa == [0.0] * 10
    assert a == np.random.default_rng(7).choice(50, size=10, replace=False).tolist()


def test_random_k_larger_than_pool():
    out, _ = select_random([np.array([0])] * 3, 10, seed=0)
    assert sorted(out) == [0, 1, 2]


def test_registry_names():
    assert SELECTORS.get("random") is select_random
    assert {"random", "zipcal"} <= set(SELECTORS.names())
