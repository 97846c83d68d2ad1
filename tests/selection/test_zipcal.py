"""selection.zipcal: greedy coverage order, ties, small pools, coverage(), two-round form."""
import numpy as np

from raycompress.registry import SELECTORS
from raycompress.selection.base import SelectContext, Window
from raycompress.selection.zipcal import coverage, zipcal_greedy


def _c(*sets):
    return [np.array(sorted(s), dtype=np.int32) for s in sets]


def _windows(concepts):
    return [Window(f"f:0:{i}", "s", [str(i)], np.zeros(4, np.int32), c) for i, c in enumerate(concepts)]


def test_greedy_known_order():
    concepts = _c({1, 2, 3}, {3, 4}, {5}, {1, 2})
    assert zipcal_greedy(concepts, 2, np.random.default_rng(0)) == [0, 1]
    assert zipcal_greedy(concepts, 4, np.random.default_rng(0)) == [0, 1, 2, 3]


def test_tie_broken_by_larger_total():
    # {5,6} and {4,5,6} both add 2 new concepts after {1,2,3,4}; the larger total wins
    concepts = _c({1, 2, 3, 4}, {5, 6}, {4, 5, 6})
    assert zipcal_greedy(concepts, 2, np.random.default_rng(0)) == [0, 2]


def test_tie_with_equal_totals_takes_earlier():
    assert zipcal_greedy(_c({1, 2}, {3, 4}, {5, 6}), 3, np.random.default_rng(0)) == [0, 1, 2]


def test_pool_smaller_than_k_returns_all():
    out = zipcal_greedy(_c({1}, {2}, {1, 2}), 10, np.random.default_rng(0))
    assert sorted(out) == [0, 1, 2] and out[0] == 2


def test_coverage_values():
    concepts = _c({1, 2, 3}, {3, 4}, {5}, {1, 2})
    assert coverage(concepts, [0, 1]) == 4 and coverage(concepts, [0, 3]) == 3 and coverage(concepts, []) == 0


def test_local_scores_are_new_concepts_and_merge_is_order_free():
    m = SELECTORS.get("zipcal")
    ctx = SelectContext(seed=0)
    wins = m.local(_windows(_c({1, 2, 3}, {3, 4}, {5}, {1, 2})), 3, ctx, "f:0")
    assert [w.uid for w in wins] == ["f:0:0", "f:0:1", "f:0:2"] and [w.score for w in wins] == [3.0, 1.0, 1.0]
    a = m.merge(list(wins), 2, ctx)
    b = m.merge(list(reversed(wins)), 2, ctx)
    assert [w.uid for w in a] == [w.uid for w in b] == ["f:0:0", "f:0:1"]


def test_candidate_pool_is_seeded():
    rng = np.random.default_rng(0)
    concepts = [rng.choice(500, size=20, replace=False).astype(np.int32) for _ in range(60)]
    a = zipcal_greedy(concepts, 10, np.random.default_rng(3), pool=5)
    b = zipcal_greedy(concepts, 10, np.random.default_rng(3), pool=5)
    assert a == b and len(set(a)) == 10
