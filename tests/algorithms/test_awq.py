"""algorithms.awq: the grid search, its Hessian loss against measured output errors, ties, failures."""
import pytest
import torch

from raycompress.algorithms.awq import awq_scales, awq_search


def rtn_int4(w: torch.Tensor, group: int = 8) -> torch.Tensor:
    """Symmetric int4 round-to-nearest fake quantization, one scale per `group` columns of a row."""
    g = w.reshape(w.shape[0], -1, group)
    scale = (g.abs().amax(-1, keepdim=True) / 7.5).clamp_min(1e-12)
    return (torch.round(g / scale).clamp(-8, 7) * scale).reshape(w.shape)


def _problem(seed=0, n=512, d_in=32, outlier=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    if outlier is not None:
        x[:, outlier] *= 40
    ws = [torch.randn(16, d_in, generator=g), torch.randn(24, d_in, generator=g)]
    return x, ws


def _measured(ws, x, s):
    """Σ_i ||W_i x - W_i' x||² per token, W_i' = Q(W_i s) / s, from the activations themselves."""
    total = 0.0
    for w in ws:
        wq = rtn_int4(w * s) / s
        total += float(((w - wq).double() @ x.T).pow(2).sum()) / x.shape[0]
    return total


def test_hessian_loss_equals_measured_output_error():
    x, ws = _problem(outlier=3)
    act_mean = x.abs().mean(0)
    r = awq_search(ws, act_mean, x.T @ x / x.shape[0], rtn_int4, n_grid=10)
    assert len(r.losses) == 10
    for i, loss in enumerate(r.losses):
        assert loss == pytest.approx(_measured(ws, x, awq_scales(act_mean, i / 10)), rel=1e-10)
    assert r.loss == min(r.losses) and r.losses[round(r.ratio * 10)] == r.loss
    assert torch.equal(r.scales, awq_scales(act_mean, r.ratio)) and r.scales.dtype == torch.float32


def test_ratio_zero_is_round_to_nearest():
    x, ws = _problem()
    act_mean = x.abs().mean(0)
    assert torch.equal(awq_scales(act_mean, 0.0), torch.ones(32))
    assert torch.equal(awq_scales(torch.zeros(32), 0.0), torch.ones(32))  # 0^0 = 1: dead channels too
    r = awq_search(ws, act_mean, x.T @ x / x.shape[0], rtn_int4, n_grid=4)
    rtn_loss = sum(float(((w - rtn_int4(w)).double() @ x.T).pow(2).sum()) for w in ws) / x.shape[0]
    assert r.loss_unscaled == r.losses[0] == pytest.approx(rtn_loss, rel=1e-10)


def test_scales_are_normalised_as_llm_awq():
    s = awq_scales(torch.tensor([4.0, 1.0, 0.0]), 0.5)  # [2, 1, 1e-4] / sqrt(2e-4)
    assert torch.allclose(s, torch.tensor([2.0, 1.0, 1e-4]) / (2e-4) ** 0.5)
    assert s.max() * s.min() == pytest.approx(1.0)


def test_outlier_channel_wants_a_positive_ratio():
    x, ws = _problem(seed=2, outlier=5)
    r = awq_search(ws, x.abs().mean(0).float(), (x.T @ x / x.shape[0]).float(), rtn_int4)
    assert r.ratio > 0 and r.loss < 0.9 * r.loss_unscaled
    assert r.scales[5] == r.scales.max()


def test_split_hessian_gives_bit_identical_result():
    # small integers: every float64 partial sum of x xᵀ is exact, so H from two actors' halves
    # is the same tensor as H from one, and the search, a function of H alone, the same bits
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-8, 9, (400, 32), generator=g).double()
    x[:, 7] *= 16
    ws = [torch.randn(16, 32, generator=g)]
    act_mean = x.abs().mean(0)
    h_one = x.T @ x / 400
    h_two = (x[:150].T @ x[:150] + x[150:].T @ x[150:]) / 400
    assert torch.equal(h_one, h_two)
    a, b = awq_search(ws, act_mean, h_one, rtn_int4), awq_search(ws, act_mean, h_two.clone(), rtn_int4)
    assert torch.equal(a.scales, b.scales) and a.losses == b.losses and a.ratio == b.ratio
    assert a.ratio > 0


def test_general_split_hessian_agrees_to_rounding():
    x, ws = _problem(seed=4, outlier=9)
    act_mean = x.abs().mean(0)
    h_one = x.T @ x / x.shape[0]
    h_two = (x[:200].T @ x[:200] + x[200:].T @ x[200:]) / x.shape[0]
    a, b = awq_search(ws, act_mean, h_one, rtn_int4), awq_search(ws, act_mean, h_two, rtn_int4)
    assert a.ratio == b.ratio and a.losses == pytest.approx(b.losses, rel=1e-12)


def test_ties_pick_the_smallest_ratio_and_input_is_untouched():
    x, ws = _problem()
    copies = [w.clone() for w in ws]
    r = awq_search(ws, x.abs().mean(0), x.T @ x / x.shape[0], lambda w: w.clone())  # no quantization
    assert r.ratio == 0.0 and r.loss == pytest.approx(0.0, abs=1e-6)
    assert torch.equal(r.scales, torch.ones(32))
    assert all(torch.equal(a, b) for a, b in zip(copies, ws))


def test_non_finite_points_are_skipped_all_non_finite_raises():
    x, ws = _problem(outlier=3)
    h = x.T @ x / x.shape[0]
    calls = []

    def nan_first_point(w):  # one linear: call k is grid point k
        calls.append(1)
        return torch.full_like(w, float("nan")) if len(calls) == 1 else rtn_int4(w)

    r = awq_search(ws[:1], x.abs().mean(0), h, nan_first_point, n_grid=5)
    assert r.losses[0] != r.losses[0] and r.loss_unscaled != r.loss_unscaled  # NaN kept
    assert r.ratio > 0 and r.loss == min(r.losses[1:])
    with pytest.raises(ValueError, match="NaN/Inf at every"):
        awq_search(ws, x.abs().mean(0), h, lambda w: torch.full_like(w, float("inf")), n_grid=3)


def test_shape_and_input_errors():
    x, ws = _problem()
    h, m = x.T @ x, x.abs().mean(0)
    with pytest.raises(ValueError, match="h must"):
        awq_search(ws, m, h[:4, :4], rtn_int4)
    with pytest.raises(ValueError, match=r"weights\[1\]"):
        awq_search([ws[0], torch.ones(3, 5)], m, h, rtn_int4)
    with pytest.raises(ValueError, match="act_mean"):
        awq_search(ws, -m, h, rtn_int4)
    with pytest.raises(ValueError, match="n_grid"):
        awq_search(ws, m, h, rtn_int4, n_grid=0)
