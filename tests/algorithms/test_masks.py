"""algorithms.masks: exact counts and N:M patterns."""
import math

import pytest
import torch

from raycompress.algorithms.masks import nm_mask, sparsity_of, unstructured_mask


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.3, 0.9])
def test_unstructured_per_row_exact_count(sparsity):
    torch.manual_seed(0)
    score = torch.rand(7, 10)
    mask = unstructured_mask(score, sparsity, per_row=True)
    k = math.floor(sparsity * 10)
    assert mask.dtype == torch.bool and mask.shape == score.shape
    assert mask.sum(1).tolist() == [k] * 7
    # the pruned entries of each row are its k lowest scores
    for r in range(7):
        if k:
            assert score[r][mask[r]].max() < score[r][~mask[r]].min()


def test_unstructured_per_matrix_exact_count_and_lowest():
    torch.manual_seed(1)
    score = torch.rand(6, 9)
    mask = unstructured_mask(score, 0.4, per_row=False)
    assert int(mask.sum()) == math.floor(0.4 * 54) == 21
    assert score[mask].max() < score[~mask].min()
    # per-matrix counts may differ per row: a matrix whose row 0 holds all small values
    s = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    m = unstructured_mask(s, 0.5)
    assert m.tolist() == [[True] * 4, [True, True, False, False], [False] * 4]


def test_unstructured_known_answer_per_row():
    s = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.5, 0.1, 0.9, 0.7]])
    m = unstructured_mask(s, 0.5, per_row=True)
    assert m.tolist() == [[False, True, False, True], [True, True, False, False]]


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_unstructured_bad_sparsity(bad):
    with pytest.raises(ValueError, match="sparsity"):
        unstructured_mask(torch.rand(2, 4), bad)


def test_unstructured_not_2d():
    with pytest.raises(ValueError, match="2-D"):
        unstructured_mask(torch.rand(8), 0.5)


def test_nm_2_4_exact_pattern():
    torch.manual_seed(2)
    score = torch.rand(5, 16)
    mask = nm_mask(score, 2, 4)
    groups = mask.reshape(5, 4, 4)
    assert (groups.sum(-1) == 2).all()
    sg = score.reshape(5, 4, 4)
    # pruned are the two lowest of each group
    assert (torch.where(groups, sg, -1.0).amax(-1) < torch.where(groups, 2.0, sg).amin(-1)).all()


def test_nm_known_answer():
    s = torch.tensor([[1.0, 4.0, 2.0, 3.0, 9.0, 8.0, 7.0, 6.0]])
    assert nm_mask(s, 2, 4).tolist() == [[True, False, True, False, False, False, True, True]]
    assert nm_mask(s, 1, 4).sum().item() == 6


def test_nm_errors():
    with pytest.raises(ValueError, match="divisible"):
        nm_mask(torch.rand(2, 6), 2, 4)
    with pytest.raises(ValueError, match="0 < N < M"):
        nm_mask(torch.rand(2, 8), 4, 4)
    with pytest.raises(ValueError, match="0 < N < M"):
        nm_mask(torch.rand(2, 8), 0, 4)


def test_sparsity_of():
    assert sparsity_of(torch.tensor([[0.0, 1.0], [0.0, 0.0]])) == 0.75
    assert sparsity_of(torch.zeros(0)) == 0.0
