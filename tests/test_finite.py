"""finite.count_nonfinite: the one NaN/Inf check of the solvers and the checkpoint code."""
import torch

from raycompress.finite import count_nonfinite


def test_counts_nan_and_inf_across_row_blocks():
    t = torch.zeros(7, 3, 2)
    t[0, 0, 0], t[3, 2, 1], t[6, 1, 0] = float("nan"), float("inf"), -float("inf")
    assert [count_nonfinite(t, rows) for rows in (1, 2, 512)] == [3, 3, 3]
    assert count_nonfinite(t.to(torch.bfloat16)) == 3
    assert count_nonfinite(torch.tensor(float("nan"))) == 1  # 0-dim


def test_finite_integer_and_empty_tensors_count_zero():
    assert count_nonfinite(torch.randn(5, 4)) == 0
    assert count_nonfinite(torch.ones(3, dtype=torch.int64)) == 0
    assert count_nonfinite(torch.empty(0, 4)) == 0
