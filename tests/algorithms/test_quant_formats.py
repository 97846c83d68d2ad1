"""algorithms.quant / algorithms.gptq for every grid type: known answers, bit-exact agreement with
compressed-tensors' own quantization arithmetic (the library that packs and loads our checkpoints),
and GPTQ equal to RTN without correlations, no worse than RTN with them."""
import pytest
import torch

from raycompress.algorithms.gptq import gptq_quantize
from raycompress.algorithms.quant import QuantSpec, fake_quant, global_scale_for, qparams, round_fp4, rtn

ct_forward = pytest.importorskip("compressed_tensors.quantization.lifecycle.forward")
from compressed_tensors.quantization import QuantizationArgs  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam  # noqa: E402

INT4 = QuantSpec(4, True, 16)
NVFP4 = QuantSpec(4, True, 16, type="fp4")


def test_int_known_values():
    deq, scale, zero = rtn(torch.tensor([[-1.5, 0.5, 0.75]]), QuantSpec(4, True))
    assert torch.allclose(scale, torch.tensor([[0.2]])) and zero.item() == 0
    assert torch.allclose(deq, torch.tensor([[-1.6, 0.4, 0.8]]))  # codes -8 (-7.5, half to even), 2, 4 (3.75)
    r = rtn(torch.tensor([[0.0, 1.5, 0.75, 0.05]]), QuantSpec(4, False))  # asym: lo 0, hi 1.5
    assert torch.allclose(r.scale, torch.tensor([[0.1]])) and r.zero.item() == -8
    assert torch.allclose(r.weight, torch.tensor([[0.0, 1.5, 0.8, 0.0]]))  # codes: 0.75 / 0.1 - 8 = -0.5 -> 0; 0.05: -7.5 -> -8


def test_fp8_known_values():
    r = rtn(torch.tensor([[448.0, 17.0, 0.3, -1.0]]), QuantSpec(8, True, type="fp8"))
    assert r.scale.item() == 1.0 and r.global_scale is None
    assert r.weight.tolist() == [[448.0, 16.0, 0.3125, -1.0]]  # 17 is a tie between 16 and 18: even mantissa
    t = rtn(torch.tensor([[2.0, 1.0], [8.0, 0.5]]), QuantSpec(8, True, type="fp8", tensor=True))
    assert torch.equal(t.scale, torch.full((2, 1), 8.0 / 448))  # one scale for the whole tensor


def test_fp4_known_values():
    assert round_fp4(torch.tensor([0.25, 0.26, 0.75, 1.25, 1.3, 1.75, 2.5, 2.6, 3.5, 5.0, 5.1, -0.74])).tolist() == \
        [0.0, 0.5, 1.0, 1.0, 1.5, 2.0, 2.0, 3.0, 4.0, 4.0, 6.0, -0.5]
    row = torch.tensor([[6.0, 0.25, 0.75, 1.25, 2.5, 5.0, -3.2, 0.3, 1.0, 1.5, 2.0, 3.0, 4.0, -6.0, 0.0, 0.1]])
    r = rtn(row, NVFP4)  # max|w| = 6: global scale 448, group scale fp8(448 * 6 / 6) = 448, step 1
    assert r.global_scale.tolist() == [448.0] and r.scale.tolist() == [[448.0]]
    assert r.weight.tolist() == [[6.0, 0.0, 1.0, 1.0, 2.0, 4.0, -3.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, -6.0, 0.0, 0.0]]
    half = rtn(torch.cat([row, row / 2], 1), NVFP4)  # second group: group scale 224, values at half the step
    assert half.scale.tolist() == [[448.0, 224.0]]
    assert torch.equal(half.weight[:, 16:], r.weight / 2)


def _ct_reference(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """compressed-tensors' qparams and fake_quantize for w (d_out, d_in) in its own dtype (the
    qparams dtype), applied to w in float32 as the compressor does; result in w's dtype."""
    kind = "float" if spec.type != "int" else "int"
    strategy = "tensor" if spec.tensor else "channel" if spec.group_size is None else \
        ("tensor_group" if spec.type == "fp4" else "group")
    args = QuantizationArgs(num_bits=spec.bits, type=kind, symmetric=spec.symmetric, strategy=strategy,
                            group_size=spec.group_size,
                            **({"scale_dtype": torch.float8_e4m3fn} if spec.type == "fp4" else {}))
    gs = generate_gparam(w.amin(), w.amax()) if spec.type == "fp4" else None
    if strategy == "tensor":
        lo, hi = w.amin(), w.amax()
    elif strategy == "channel":
        lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    else:
        grouped = w.unflatten(-1, (w.shape[1] // spec.group_size, spec.group_size))
        lo, hi = grouped.amin(-1), grouped.amax(-1)
    scale, zp = calculate_qparams(lo, hi, args, global_scale=gs)
    out = ct_forward.fake_quantize(w.float(), scale, None if spec.symmetric else zp, args, global_scale=gs)
    return out.to(w.dtype)


SPECS = [QuantSpec(4, True, 16), QuantSpec(4, False, 16), QuantSpec(8, True, None), QuantSpec(4, False, None),
         QuantSpec(8, False, 32), QuantSpec(8, True, type="fp8", tensor=True), QuantSpec(8, True, type="fp8"),
         NVFP4]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_bit_exact_against_compressed_tensors(spec, dtype):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(24, 64, generator=g) * torch.logspace(-3, 1, 24).unsqueeze(1)).to(dtype)
    w[3, :16] = 0  # an all-zero group
    w[5] += 0.4  # a row without negative values
    ours = rtn(w, spec)
    ref = _ct_reference(w, spec)
    assert torch.equal(ours.weight.to(dtype), ref), (ours.weight.to(dtype) - ref).abs().max()
    if spec.type == "fp4":
        assert torch.equal(ours.global_scale, generate_gparam(w.amin(), w.amax()))
    # the scale is one the checkpoint can store exactly: in the weight's dtype (FP8 for NVFP4)
    stored = torch.float8_e4m3fn if spec.type == "fp4" else dtype
    assert torch.equal(ours.scale.to(stored).float(), ours.scale)


def test_qparams_in_float32_unless_told():
    w = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    s32, _ = qparams(w, INT4)
    s16, _ = qparams(w, QuantSpec(4, True, 16, weight_dtype=torch.bfloat16))
    assert torch.equal(s16, s16.bfloat16().float()) and not torch.equal(s16, s32)
    assert global_scale_for(w, INT4) is None
    with pytest.raises(ValueError, match="global scale"):
        fake_quant(w, s32, s32 * 0, NVFP4)


@pytest.mark.parametrize("bad", [dict(type="fp8"), dict(type="fp4", bits=4), dict(bits=8, type="fp8", symmetric=False),
                                 dict(tensor=True, group_size=16), dict(type="nf4")])
def test_bad_specs_refused(bad):
    with pytest.raises(ValueError):
        QuantSpec(**bad)


def _problem(seed=0, d_out=16, d_in=64, n=512):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d_in, d_in, generator=g) * 0.3 + torch.eye(d_in)
    x = a @ torch.randn(d_in, n, generator=g)
    return torch.randn(d_out, d_in, generator=g), x, x @ x.T


def _loss(w, q, h):
    d = (w - q).double()
    return float(torch.einsum("ij,jk,ik->", d, h.double(), d))


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_gptq_identity_hessian_is_rtn(spec):
    w, _, _ = _problem()
    r = gptq_quantize(w, torch.eye(w.shape[1]), spec, block_size=32)
    ref = rtn(w, spec)
    assert torch.equal(r.weight, ref.weight) and torch.equal(r.scale, ref.scale) and torch.equal(r.zero, ref.zero)
    assert (r.global_scale is None) == (spec.type != "fp4")
    if spec.type == "fp4":
        assert torch.equal(r.global_scale, ref.global_scale)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_gptq_no_worse_than_rtn(spec, act_order):
    w, _, h = _problem(seed=2)
    r = gptq_quantize(w, h, spec, block_size=32, act_order=act_order)
    assert _loss(w, r.weight, h) <= _loss(w, rtn(w, spec).weight, h)
    # every value on its group's grid: re-rounding with the returned parameters changes nothing
    g = spec.group_size or w.shape[1]
    for c in range(0, w.shape[1], g):
        cols = r.weight[:, c:c + g]
        assert torch.equal(fake_quant(cols, r.scale[:, c // g], r.zero[:, c // g], spec, r.global_scale), cols)
