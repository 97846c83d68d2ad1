"""algorithms.magnitude: per-matrix lowest |W|, N:M."""
import torch

from raycompress.algorithms.magnitude import magnitude_prune


def test_magnitude_known_answer_per_matrix():
    w = torch.tensor([[1.0, -5.0, 0.5, 3.0], [-2.0, 0.1, 4.0, -0.2]])
    w2, mask = magnitude_prune(w, 0.5)
    # |w| lowest four of eight: 0.1, 0.2, 0.5, 1.0 (rows may differ in count)
    assert mask.tolist() == [[True, False, True, False], [False, True, False, True]]
    assert w2.tolist() == [[0.0, -5.0, 0.0, 3.0], [-2.0, 0.0, 4.0, 0.0]]
    assert w.tolist()[0][2] == 0.5  # input untouched


def test_magnitude_exact_sparsity_and_dtype():
    torch.manual_seed(0)
    w = torch.randn(16, 32, dtype=torch.float16)
    w2, mask = magnitude_prune(w, 0.375)
    assert w2.dtype == torch.float16
    assert int(mask.sum()) == int(0.375 * 512)
    assert (w2[mask] == 0).all() and torch.equal(w2[~mask], w[~mask])
    assert w[mask].abs().max() <= w[~mask].abs().min()


def test_magnitude_2_4():
    torch.manual_seed(1)
    w = torch.randn(8, 16)
    w2, mask = magnitude_prune(w, 0.9, n_m=(2, 4))  # sparsity ignored under N:M
    assert ((w2.reshape(8, 4, 4) == 0).sum(-1) == 2).all()
    assert int(mask.sum()) == 64
