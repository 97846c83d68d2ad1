"""algorithms.wanda: |W| * ||X_j|| per row."""
import pytest
import torch

from raycompress.algorithms.magnitude import magnitude_prune
from raycompress.algorithms.wanda import wanda_prune, wanda_score


def test_wanda_per_row_exact_sparsity():
    torch.manual_seed(0)
    w = torch.randn(9, 20)
    xs = torch.rand(20) * 5
    w2, mask = wanda_prune(w, xs, 0.5)
    assert mask.sum(1).tolist() == [10] * 9
    assert ((w2 == 0).sum(1) == 10).all()
    score = w.abs() * xs.sqrt()
    for r in range(9):
        assert score[r][mask[r]].max() <= score[r][~mask[r]].min()


def test_wanda_activation_flips_choice_vs_magnitude():
    # row 0: |w| = [1, 2, 3, 4]; magnitude prunes columns 0,1.
    # column 0 has a huge activation norm (sqnorm 100 -> x10), column 3 tiny (sqnorm 0.01 -> x0.1):
    # scores = [10, 2, 3, 0.4] -> Wanda prunes columns 3 and 1.
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-4.0, 3.0, -2.0, 1.0]])
    xs = torch.tensor([100.0, 1.0, 1.0, 0.01])
    _, mag_mask = magnitude_prune(w[:1], 0.5)
    assert mag_mask.tolist() == [[True, True, False, False]]
    w2, mask = wanda_prune(w, xs, 0.5)
    # row 1 scores = [40, 3, 2, 0.1] -> prune 3, 2
    assert mask.tolist() == [[False, True, False, True], [False, False, True, True]]
    assert w2.tolist() == [[1.0, 0.0, 3.0, 0.0], [-4.0, 3.0, 0.0, 0.0]]


def test_wanda_score_values_and_shape_check():
    w = torch.tensor([[-2.0, 3.0]])
    assert wanda_score(w, torch.tensor([4.0, 9.0])).tolist() == [[4.0, 9.0]]
    with pytest.raises(ValueError, match="x_sqnorm"):
        wanda_score(w, torch.ones(3))


def test_wanda_2_4():
    torch.manual_seed(3)
    w = torch.randn(6, 12)
    xs = torch.rand(12)
    w2, mask = wanda_prune(w, xs, 0.5, n_m=(2, 4))
    assert (mask.reshape(6, 3, 4).sum(-1) == 2).all()
    assert ((w2.reshape(6, 3, 4) == 0).sum(-1) == 2).all()
