"""algorithms.quant and algorithms.gptq: grids, round trips, GPTQ beating round-to-nearest."""
import pytest
import torch

from raycompress.algorithms.gptq import gptq_quantize
from raycompress.algorithms.quant import QuantSpec, fake_quant, qparams, quantize_int, rtn
from raycompress.algorithms.sparsegpt import sparsegpt_prune


def _problem(seed=0, d_out=16, d_in=128, n=1024):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d_in, d_in, generator=g) * 0.3 + torch.eye(d_in)
    x = a @ torch.randn(d_in, n, generator=g)  # correlated features
    return torch.randn(d_out, d_in, generator=g), x, x @ x.T


def _err(w, wq, x):
    return float(((w - wq) @ x).pow(2).sum() / (w @ x).pow(2).sum())


def test_symmetric_qparams_known_values():
    spec = QuantSpec(bits=4, symmetric=True)
    scale, zero = qparams(torch.tensor([[-1.5, 0.5, 0.75]]), spec)
    assert torch.allclose(scale, torch.tensor([1.5 / 7.5])) and zero.item() == 0
    codes = quantize_int(torch.tensor([[-1.5, 0.5, 0.75]]), scale, zero, spec)
    assert codes.tolist() == [[-8.0, 2.0, 4.0]]  # -7.5 clamps to -8; 0.75/0.2 = 3.75 -> 4


def test_asymmetric_round_trip_within_half_step():
    spec = QuantSpec(bits=4, symmetric=False)
    w = torch.linspace(-0.3, 1.2, 16).reshape(1, 16)
    scale, zero = qparams(w, spec)
    assert torch.all((fake_quant(w, scale, zero, spec) - w).abs() <= scale / 2 + 1e-6)


@pytest.mark.parametrize("spec", [QuantSpec(4, True, None), QuantSpec(4, True, 32), QuantSpec(8, True, 64), QuantSpec(4, False, 32)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_on_grid_and_better_than_rtn(spec, act_order):
    w, x, h = _problem()
    r = gptq_quantize(w, h, spec, block_size=64, act_order=act_order)
    q, scale, zero, used = r.weight, r.scale, r.zero, r.damping
    g = spec.group_size or w.shape[1]
    s, z = scale.repeat_interleave(g, 1), zero.repeat_interleave(g, 1)
    codes = torch.round(q / s + z)
    assert torch.allclose((codes - z) * s, q, atol=1e-5)  # every value is on its group's grid
    assert codes.min() >= spec.qmin and codes.max() <= spec.qmax
    assert _err(w, q, x) < 0.75 * _err(w, rtn(w, spec)[0], x)
    assert used == 0.01


def test_gptq_rejects_group_not_dividing():
    w, _, h = _problem()
    with pytest.raises(ValueError, match="group size"):
        gptq_quantize(w, h, QuantSpec(4, True, 48))


def test_joint_sparse_quant_keeps_mask_and_grid():
    w, x, h = _problem(1)
    spec = QuantSpec(4, True, 32)
    r = sparsegpt_prune(w, h, 0.5, block_size=64, quant=spec)
    q, mask, scale, zero = r.weight, r.mask, r.scale, r.zero
    assert torch.all(q[mask] == 0) and abs(float(mask.float().mean()) - 0.5) < 0.01
    s, z = scale.repeat_interleave(32, 1), zero.repeat_interleave(32, 1)
    assert torch.allclose((torch.round(q / s + z) - z) * s, q, atol=1e-5)
    sparse_only = sparsegpt_prune(w, h, 0.5, block_size=64).weight
    # quantizing on top costs a little, far less than naive RTN of the sparse weights
    naive = sparse_only.clone()
    for c in range(0, 128, 32):
        sc, zc = qparams(naive[:, c : c + 32], spec)
        naive[:, c : c + 32] = fake_quant(naive[:, c : c + 32], sc, zc, spec)
    assert _err(w, q, x) < _err(w, naive, x)
