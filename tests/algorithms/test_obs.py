"""algorithms.obs: the in-place inverse-Hessian factor against the reference construction, its
retry path, and the sweep's loss as the OBS reconstruction error."""
import pytest
import torch

from raycompress.algorithms.obs import HessianNotPositiveDefinite, inverse_cholesky_, obs_factor_
from raycompress.algorithms.sparsegpt import sparsegpt_prune


def _h(d, seed=0, n=None, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n or 3 * d, d, generator=g, dtype=dtype)
    return x.T @ x


@pytest.mark.parametrize("d,block", [(7, 3), (64, 16), (100, 512), (130, 32)])
def test_in_place_factor_matches_reference(d, block):
    """U^T U = (H + λI)^-1 and U equals cholesky(cholesky_inverse(cholesky(H + λI)), upper) (the
    IST-DASLab construction), for block sizes that do and do not divide d."""
    h = _h(d)
    h[:, 2] = h[2, :] = 0  # a dead input
    u = h.clone()
    buf = u.data_ptr()
    used = inverse_cholesky_(u, 0.01, block=block)
    assert used == 0.01 and u.data_ptr() == buf and torch.equal(u, u.triu())
    hd = h.clone()
    diag = torch.diagonal(hd)
    diag[diag == 0] = 1
    hd += 0.01 * diag.mean() * torch.eye(d, dtype=h.dtype)
    ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hd)), upper=True)
    torch.testing.assert_close(u, ref, atol=1e-10, rtol=1e-8)


def test_failed_factorisation_restores_and_retries():
    h = torch.tensor([[1.0, 1.5, 0.0], [1.5, 1.0, 0.0], [0.0, 0.0, 2.0]], dtype=torch.float64)  # indefinite
    u = h.clone()
    used = inverse_cholesky_(u, 0.0, max_tries=10, block=1)
    mean = float(torch.diagonal(h).mean())
    # the retry restored H from its untouched triangle: the result is the factor of H + used·mean·I
    torch.testing.assert_close(u.T @ u, torch.linalg.inv(h + used * mean * torch.eye(3, dtype=h.dtype)))


def test_non_finite_hessian_is_named():
    h = _h(4)
    h[1, 1] = float("nan")
    with pytest.raises(HessianNotPositiveDefinite, match="NaN or Inf"):
        inverse_cholesky_(h, 0.01)


def test_sweep_loss_is_the_reconstruction_error():
    """SparseGPT's loss = tr((W - Ŵ) H_λ (W - Ŵ)^T) for the damped Hessian it factored."""
    torch.manual_seed(0)
    d = 32
    h = _h(d, 1, dtype=torch.float32)
    w = torch.randn(8, d)
    r = sparsegpt_prune(w, h, 0.5, block_size=8, damping=0.01)
    hd = h + 0.01 * torch.diagonal(h).mean() * torch.eye(d)
    delta = (w - r.weight).double()
    assert r.loss == pytest.approx(float((delta @ hd.double() * delta).sum()), rel=1e-3)


def test_factor_is_shared_by_a_group():
    """Two linears with one input: one factor, the same result as two separate solves."""
    h = _h(16, 2, dtype=torch.float32)
    w1, w2 = torch.randn(4, 16), torch.randn(6, 16)
    f = obs_factor_(h.clone(), 0.01)
    for w in (w1, w2):
        shared = sparsegpt_prune(w, None, 0.5, block_size=8, factor=f)
        alone = sparsegpt_prune(w, h, 0.5, block_size=8)
        assert torch.equal(shared.weight, alone.weight)
