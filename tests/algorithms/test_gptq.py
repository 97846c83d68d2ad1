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


def _reference_gptq(w, h, spec, block_size, damping=0.01, refit_in_block=False):
    """GPTQ.fasterquant of github.com/IST-DASLab/gptq (groups, natural order), column by column in
    float64: at column i with i % g == 0 the group's parameters are fitted on the *outer* W, which
    the lazy update changes only at block ends. `refit_in_block`: fit them instead on the block's
    weights as the sweep holds them then (what this module did before; not the reference)."""
    d_out, d_in = w.shape
    g = spec.group_size
    W, H = w.double().clone(), h.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damping * torch.diag(H).mean() * torch.eye(d_in, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    scales, zeros = torch.zeros(d_out, d_in // g), torch.zeros(d_out, d_in // g)
    for i1 in range(0, d_in, block_size):
        i2 = min(i1 + block_size, d_in)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(d_out, i2 - i1, dtype=W.dtype), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if (i1 + i) % g == 0:
                cols = W1[:, i:i + g] if refit_in_block else W[:, i1 + i:i1 + i + g]
                scale, zero = qparams(cols, spec)
                scales[:, (i1 + i) // g], zeros[:, (i1 + i) // g] = scale, zero
            q = fake_quant(W1[:, i:i + 1], scale, zero, spec).flatten().double()
            err = (W1[:, i] - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Q[:, i1 + i], Err1[:, i] = q, err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q, scales, zeros


@pytest.mark.parametrize("symmetric", [True, False])
def test_groups_smaller_than_a_block_match_the_reference(symmetric):
    """group_size 4 < block_size 8: a group's parameters come from its weights at its block's start
    (the reference's outer W), so the second group of each block is not refitted after the first
    group's errors were spread over it."""
    w, x, h = _problem(seed=3, d_out=6, d_in=32, n=256)
    spec = QuantSpec(4, symmetric, 4)
    r = gptq_quantize(w, h, spec, block_size=8)
    q_ref, s_ref, z_ref = _reference_gptq(w, h, spec, 8)
    torch.testing.assert_close(r.scale, s_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(r.zero, z_ref, rtol=0, atol=0)
    torch.testing.assert_close(r.weight, q_ref.float(), rtol=0, atol=1e-4)  # every code the same
    # the pin means something: refitting inside the block gives other parameters for the second groups
    _, s_refit, _ = _reference_gptq(w, h, spec, 8, refit_in_block=True)
    torch.testing.assert_close(s_refit[:, 0], s_ref[:, 0], rtol=1e-4, atol=1e-6)  # nothing compensated yet
    assert (s_refit[:, 1::2] - s_ref[:, 1::2]).abs().max() > 1e-3
    # group_size == block_size: every group starts its block, and both ways agree
    r8 = gptq_quantize(w, h, QuantSpec(4, symmetric, 8), block_size=8)
    torch.testing.assert_close(r8.scale, _reference_gptq(w, h, QuantSpec(4, symmetric, 8), 8)[1], rtol=1e-4, atol=1e-6)
