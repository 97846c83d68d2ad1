"""algorithms.owl: outlier counts and layer sparsities (mean kept, spread 2λ, order by outliers)."""
import pytest
import torch

from raycompress.algorithms.owl import outlier_count, owl_sparsities


def test_outlier_count_known():
    score = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 31.0]])  # mean 4, 5x mean = 20
    assert outlier_count(score, 5.0) == (1, 10)


def test_sparsities_keep_mean_and_order():
    s = owl_sparsities([0.01, 0.03, 0.02], target=0.5, lam=0.1)
    assert s == pytest.approx([0.6, 0.4, 0.5])  # most outliers -> least pruned; spread 2λ
    assert sum(s) / 3 == pytest.approx(0.5)
    assert owl_sparsities([0.02, 0.02], 0.7, 0.08) == pytest.approx([0.7, 0.7])


def test_out_of_range_raises():
    with pytest.raises(ValueError, match="lower owl.lam"):
        owl_sparsities([0.0, 1.0], target=0.95, lam=0.2)
