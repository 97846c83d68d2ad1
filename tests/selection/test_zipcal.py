"""selection.zipcal: greedy coverage order, ties, small pools, coverage()."""
import numpy as np

from raycompress.selection.zipcal import coverage, select_zipcal, zipcal_greedy


def _c(*sets):
    return [np.array(sorted(s), dtype=np.int32) for s in sets]


def test_greedy_known_order():
    concepts = _c({1, 2, 3}, {3, 4}, {5}, {1, 2})
    rng = np.random.default_rng(0)
    assert zipcal_greedy(concepts, 2, rng) == [0, 1]
    # k=4: after {1,2,3},{3,4} -> {5} adds 1 new, {1,2} adds 0
    assert zipcal_greedy(concepts, 4, np.random.default_rng(0)) == [0, 1, 2, 3]


def test_tie_broken_by_larger_total():
    # both add 2 new concepts after nothing covered? first pick is the largest set {1,2,3,4}
    # then {5,6} (2 new, total 2) vs {4,5,6} (2 new, total 3) -> the larger total wins
    concepts = _c({1, 2, 3, 4}, {5, 6}, {4, 5, 6})
    assert zipcal_greedy(concepts, 2, np.random.default_rng(0)) == [0, 2]


def test_tie_with_equal_totals_takes_earlier():
    concepts = _c({1, 2}, {3, 4}, {5, 6})
    assert zipcal_greedy(concepts, 3, np.random.default_rng(0)) == [0, 1, 2]


def test_pool_smaller_than_k_returns_all():
    concepts = _c({1}, {2}, {1, 2})
    out = zipcal_greedy(concepts, 10, np.random.default_rng(0))
    assert sorted(out) == [0, 1, 2] and out[0] == 2


def test_coverage_values():
    concepts = _c({1, 2, 3}, {3, 4}, {5}, {1, 2})
    assert coverage(concepts, [0, 1]) == 4
    assert coverage(concepts, [0, 3]) == 3
    assert coverage(concepts, []) == 0


def test_select_zipcal_scores_are_new_concepts():
    concepts = _c({1, 2, 3}, {3, 4}, {5}, {1, 2})
    chosen, scores = select_zipcal(concepts, 3, seed=0)
    assert chosen == [0, 1, 2]
    assert scores == [3.0, 1.0, 1.0]


def test_candidate_pool_is_seeded():
    rng = np.random.default_rng(0)
    concepts = [rng.choice(500, size=20, replace=False).astype(np.int32) for _ in range(60)]
    a, _ = select_zipcal(concepts, 10, seed=3, pool=5)
    b, _ = select_zipcal(concepts, 10, seed=3, pool=5)
    assert a == b and len(set(a)) == 10
