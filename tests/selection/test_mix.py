"""selection.mix.quotas: largest-remainder split."""
from raycompress.selection.mix import quotas


def test_quotas_three_to_one():
    assert quotas(64, {"biomed": 0.75, "general": 0.25}) == {"biomed": 48, "general": 16}


def test_quotas_thirds_sum_to_n():
    q = quotas(10, {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    assert sum(q.values()) == 10
    assert q == {"a": 4, "b": 3, "c": 3}  # equal remainders: ties by name


def test_quotas_largest_remainder():
    q = quotas(7, {"x": 0.5, "y": 0.3, "z": 0.2})  # raw 3.5, 2.1, 1.4 -> floor 3,2,1; rest 1 -> x
    assert q == {"x": 4, "y": 2, "z": 1}


def test_quotas_zero_share():
    assert quotas(5, {"a": 1.0, "b": 0.0}) == {"a": 5, "b": 0}
