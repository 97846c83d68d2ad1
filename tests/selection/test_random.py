"""selection.random_select: bottom-k sampling, identical on any sharding."""
import numpy as np

from raycompress.registry import SELECTORS
from raycompress.selection.base import SelectContext, Window


def _windows(n):
    return [Window(f"f:{i // 10}:{i % 10}", "s", [str(i)], np.zeros(2, np.int32), np.zeros(0, np.int32)) for i in range(n)]


def test_seeded_and_uniform_keys():
    m = SELECTORS.get("random")
    a = [w.uid for w in m.local(_windows(50), 10, SelectContext(seed=7))]
    b = [w.uid for w in m.local(_windows(50), 10, SelectContext(seed=7))]
    c = [w.uid for w in m.local(_windows(50), 10, SelectContext(seed=8))]
    assert a == b and a != c and len(set(a)) == 10


def test_two_rounds_equal_one_round():
    m = SELECTORS.get("random")
    ctx = SelectContext(seed=1)
    whole = [w.uid for w in m.local(_windows(100), 12, ctx)]
    shards = [_windows(100)[i : i + 10] for i in range(0, 100, 10)]
    winners = [w for s in shards for w in m.local(s, 12, ctx)]
    assert [w.uid for w in m.merge(winners, 12, ctx)] == whole


def test_k_larger_than_pool():
    assert len(SELECTORS.get("random").local(_windows(3), 10, SelectContext(seed=0))) == 3


def test_registry_names():
    assert {"random", "zipcal", "zipf", "perplexity"} <= set(SELECTORS.names())
