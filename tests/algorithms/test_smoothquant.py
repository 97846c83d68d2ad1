"""algorithms.smoothquant: Eq. 4 scales, folding into a norm, statistics of the smoothed input."""
import pytest
import torch

from raycompress.algorithms.smoothquant import (
    fold_scales, smooth_abssum, smooth_absmax, smooth_hessian_, smooth_scales,
)

# channel 0: max|x| 4, max|W| over the group 1 (W1); channel 1: max|x| 1, max|W| 4 (W2)
ACT = torch.tensor([4.0, 1.0])
W1 = torch.tensor([[1.0, -0.5], [0.25, 2.0]])
W2 = torch.tensor([[-0.5, 4.0]])


@pytest.mark.parametrize("alpha, expected", [
    (0.5, [2.0, 0.5]),   # sqrt(4)/sqrt(1), sqrt(1)/sqrt(4)
    (0.0, [1.0, 0.25]),  # 1 / max|W|
    (1.0, [4.0, 1.0]),   # max|x|
])
def test_smooth_scales_two_channel_hand_example(alpha, expected):
    s = smooth_scales(ACT, [W1, W2], alpha)
    assert s.dtype == torch.float32
    assert torch.allclose(s, torch.tensor(expected), rtol=1e-6)


def test_dead_channels_get_one_and_tiny_scales_are_clamped():
    act = torch.tensor([0.0, 3.0, 1e-12, 2.0], dtype=torch.float64)
    w = torch.tensor([[5.0, 0.0, 1.0, 1.0]], dtype=torch.bfloat16)  # channel 1: weight column all 0
    s = smooth_scales(act, [w], 1.0)
    assert s.tolist()[:2] == [1.0, 1.0]
    assert s[2].item() == pytest.approx(1e-5)  # the reference's clamp(min=1e-5)
    assert s[3].item() == 2.0


def test_smooth_scales_errors_name_the_problem():
    with pytest.raises(ValueError, match="alpha"):
        smooth_scales(ACT, [W1], 1.5)
    with pytest.raises(ValueError, match="act_absmax"):
        smooth_scales(torch.tensor([float("nan"), 1.0]), [W1], 0.5)
    with pytest.raises(ValueError, match=r"weights\[1\]"):
        smooth_scales(ACT, [W1, torch.tensor([[float("inf"), 1.0]])], 0.5)
    with pytest.raises(ValueError, match=r"weights\[0\]"):
        smooth_scales(ACT, [torch.ones(2, 3)], 0.5)
    with pytest.raises(ValueError, match="act_absmax"):
        smooth_scales(torch.tensor([-1.0, 1.0]), [W1], 0.5)


def _rmsnorm(x, weight, bias=None):
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
    return y if bias is None else y + bias


@pytest.mark.parametrize("with_bias", [False, True])
def test_fold_then_outputs_unchanged(with_bias):
    g = torch.Generator().manual_seed(0)
    d = 32
    x = torch.randn(64, d, generator=g)
    x[:, 5] *= 30  # an outlier channel, as SmoothQuant targets
    nw = torch.rand(d, generator=g) + 0.5
    nb = torch.randn(d, generator=g) if with_bias else None
    ws = [torch.randn(16, d, generator=g), torch.randn(8, d, generator=g)]
    y = _rmsnorm(x, nw, nb)
    s = smooth_scales(y.abs().amax(0), ws, 0.5)
    copies = [w.clone() for w in ws], nw.clone()
    new_ws, nw2, nb2 = fold_scales(ws, nw, nb, s)
    assert (nb2 is None) == (not with_bias)
    assert all(torch.equal(a, b) for a, b in zip(copies[0], ws)) and torch.equal(copies[1], nw)  # pure
    y2 = _rmsnorm(x, nw2, nb2)
    assert torch.allclose(y2, y / s, rtol=1e-5, atol=1e-6)
    for w, w2 in zip(ws, new_ws):
        ref = y @ w.T
        assert torch.allclose(y2 @ w2.T, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_fold_keeps_dtypes_and_checks_shapes():
    s = torch.tensor([2.0, 0.5])
    new_ws, nw, nb = fold_scales([W1.bfloat16()], torch.ones(2, dtype=torch.float16), None, s)
    assert new_ws[0].dtype == torch.bfloat16 and nw.dtype == torch.float16 and nb is None
    assert new_ws[0].float().tolist() == [[2.0, -0.25], [0.5, 1.0]] and nw.tolist() == [0.5, 2.0]
    with pytest.raises(ValueError, match="norm_weight"):
        fold_scales([W1], torch.ones(3), None, s)
    with pytest.raises(ValueError, match="norm_bias"):
        fold_scales([W1], torch.ones(2), torch.ones(3), s)
    with pytest.raises(ValueError, match="s must be"):
        fold_scales([W1], torch.ones(2), None, torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_smoothed_statistics_equal_those_of_x_over_s(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 12, generator=g, dtype=torch.float64)
    s = torch.rand(12, generator=g) * 3 + 0.1
    xs = x / s.double()
    h = (x.T @ x).to(dtype)
    out = smooth_hessian_(h, s)
    assert out is h and h.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(h.double(), xs.T @ xs, rtol=tol, atol=tol * (xs.T @ xs).abs().max().item())
    assert torch.allclose(smooth_absmax(x.abs().amax(0), s), xs.abs().amax(0), rtol=1e-6)
    assert torch.allclose(smooth_abssum(x.abs().sum(0), s), xs.abs().sum(0), rtol=1e-6)
    with pytest.raises(ValueError, match="h must"):
        smooth_hessian_(torch.eye(3), s)
