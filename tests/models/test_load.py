"""models.load.load_causal_lm: a compressed-tensors checkpoint evaluates as compressed-tensors runs it.

Checkpoints are made here with compressed-tensors' own API only (preset scheme ->
`apply_quantization_config`, scales set by hand from min/max with `calculate_qparams` /
`generate_gparam`, `ModelCompressor.compress_model`, `save_pretrained`), independent of our writer.

The reference ("stock") is the in-memory model the checkpoint was compressed from, after calibration
in status FROZEN: compressed-tensors' wrapped forwards quantize-dequantize weights and input
activations on the fly (what llm-compressor runs). compressed-tensors 0.20 cannot attach its KV-cache
quantization to transformers 5 attention (it looks for a `past_key_values` argument, now `cache`), so
for the KV scheme the reference passes the model a cache that fake-quantizes keys and values as they
are written (compressed-tensors' `fake_quantize` with each attention's k_scale / v_scale), which is
where vLLM quantizes them. Where stock transformers runs the checkpoint (`dequantize=False`, its
top-level decompression hook) it is compared too. All comparisons are exact (float32, atol 0).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

SCHEMES = [("W4A16", False), ("W8A8", False), ("FP8", False), ("FP8_DYNAMIC", False), ("NVFP4", False),
           ("W4A16", True)]
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def _kv_args():
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=8, type="float", strategy="tensor", symmetric=True, dynamic=False)


def _cache(model, absmax: dict | None = None):
    """A DynamicCache recording max|k|, max|v| per layer (`absmax` given) or fake-quantizing them."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from transformers import DynamicCache

    class Cache(DynamicCache):
        def update(self, k, v, layer_idx, *args, **kwargs):
            attn = model.model.layers[layer_idx].self_attn
            if absmax is not None:
                for n, t in (("k", k), ("v", v)):
                    absmax[layer_idx, n] = torch.maximum(absmax.get((layer_idx, n), torch.zeros(())), t.abs().amax())
            else:
                k = fake_quantize(k, attn.k_scale, torch.zeros_like(attn.k_scale), _kv_args())
                v = fake_quantize(v, attn.v_scale, torch.zeros_like(attn.v_scale), _kv_args())
            return super().update(k, v, layer_idx, *args, **kwargs)

    return Cache(config=model.config)


def _tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=64)
    cfg.architectures = ["LlamaForCausalLM"]
    return LlamaForCausalLM(cfg).eval()


def _minmax(x: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    if args.strategy == "tensor":
        return x.amin().reshape(1), x.amax().reshape(1)
    if args.strategy == "channel":
        return x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    groups = x.unflatten(-1, (-1, args.group_size))
    return groups.amin(-1), groups.amax(-1)


def _set_weight_qparams(m: nn.Module) -> None:
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    args, w = m.quantization_scheme.weights, m.weight.data
    gs = None
    if args.strategy == "tensor_group":
        gs = generate_gparam(w.amin(), w.amax())
        m.weight_global_scale.data.copy_(gs)
    scale, zero = calculate_qparams(*_minmax(w, args), args, global_scale=gs)
    m.weight_scale.data.copy_(scale)
    if hasattr(m, "weight_zero_point"):
        m.weight_zero_point.data.copy_(zero)


def _set_input_qparams(m: nn.Module, lo: torch.Tensor, hi: torch.Tensor) -> None:
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    args = m.quantization_scheme.input_activations
    if args is None or args.dynamic is True:
        return
    if args.strategy == "tensor_group":  # NVFP4: a static global scale, local scales dynamic
        m.input_global_scale.data.copy_(generate_gparam(lo, hi))
        return
    scale, _ = calculate_qparams(lo.reshape(1), hi.reshape(1), args)
    m.input_scale.data.copy_(scale)


@torch.no_grad()
def _calibrate(model, kv: bool) -> None:
    """Weight qparams from the weights, static input / KV qparams from one unquantized pass on IDS."""
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.quantization.utils import calculate_qparams

    quantized = {n: m for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None}
    seen: dict[str, list[torch.Tensor]] = {}

    def record(name):
        return lambda m, args: seen.setdefault(name, []).append(args[0].detach())

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in quantized.items()]
    for m in quantized.values():
        m.quantization_enabled = False
    absmax: dict = {}
    model(IDS, cache=_cache(model, absmax) if kv else None, use_cache=kv)
    for hook in hooks:
        hook.remove()
    for n, m in quantized.items():
        del m.quantization_enabled
        x = torch.cat([t.flatten() for t in seen[n]])
        _set_weight_qparams(m)
        _set_input_qparams(m, x.amin(), x.amax())
        m.quantization_status = QuantizationStatus.FROZEN
    for (i, n), a in absmax.items():
        scale, _ = calculate_qparams(-a.reshape(1), a.reshape(1), _kv_args())
        model.model.layers[i].self_attn.register_parameter(f"{n}_scale", nn.Parameter(scale, requires_grad=False))


def _build(name: str, kv: bool, out) -> torch.Tensor:
    """Write a `name` checkpoint (W4A16: bfloat16 scales, as our writer stores them) to `out`;
    returns the in-memory fake-quantized model's float32 logits on IDS."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme

    model = _tiny()
    scheme = preset_name_to_scheme(name, ["Linear"])
    if scheme.weights.group_size == 128:
        scheme.weights.group_size = 32  # the tiny model's 64 input features
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"])
    apply_quantization_config(model, config, show_progress=False)
    _calibrate(model, kv)
    bf16 = name == "W4A16"
    for m in model.modules():
        if bf16 and hasattr(m, "weight_scale"):
            m.weight_scale.data = m.weight_scale.data.bfloat16().float()
    with torch.no_grad():
        ref = model(IDS, cache=_cache(model) if kv else None, use_cache=kv).logits
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.quantization_config.kv_cache_scheme = _kv_args() if kv else None
    compressor.compress_model(model)
    compressor.remove_decompression_hook(model)
    for m in model.modules():
        if bf16 and hasattr(m, "weight_scale"):
            m.weight_scale.data = m.weight_scale.data.bfloat16()
    model.save_pretrained(out)
    compressor.update_config(out)
    return ref


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(name, kv) -> (folder, reference logits), built on first use."""
    cache: dict = {}

    def get(name: str, kv: bool):
        if (name, kv) not in cache:
            out = tmp_path_factory.mktemp(f"{name}{'_kv' if kv else ''}".lower())
            cache[name, kv] = out, _build(name, kv, out)
        return cache[name, kv]

    return get


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize(("name", "kv"), SCHEMES)
def test_logits_equal_compressed_tensors_fake_quantized_forward(checkpoints, name, kv):
    from transformers import AutoModelForCausalLM

    from raycompress.models.load import load_causal_lm

    folder, ref = checkpoints(name, kv)
    model = load_causal_lm(folder, torch.float32)
    assert all(isinstance(m.weight, nn.Parameter) and m.weight.dtype == torch.float32
               for m in model.modules() if isinstance(m, nn.Linear))
    assert torch.equal(_logits(model), ref)
    if not kv and name != "NVFP4":  # stock transformers: float32 NVFP4 fails (unpacked in bf16), KV is ignored
        assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)), ref)


@pytest.mark.parametrize(("name", "kv"), SCHEMES)
def test_activation_quantization_is_on(checkpoints, name, kv):
    """Switching compressed-tensors' quantization off (same dense weights) changes the logits
    exactly when the scheme quantizes activations or the KV cache; so does a dequantize-only load."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from raycompress.models.load import load_causal_lm

    folder = checkpoints(name, kv)[0]
    model = load_causal_lm(folder, torch.float32)
    on = _logits(model)
    if name != "W4A16":  # W4A16's dequantize-only load differs anyway (bfloat16 products, below)
        dense = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                     quantization_config=CompressedTensorsConfig(dequantize=True))
        assert (on - _logits(dense)).abs().max() > 1e-4
    for m in model.modules():
        if getattr(m, "quantization_scheme", None) is not None:
            m.quantization_enabled = False
    assert torch.equal(on, _logits(model)) == (name == "W4A16" and not kv)
    if kv:
        attn = model.model.layers[0].self_attn
        assert attn.k_scale.shape == (1,) and float(attn.k_scale) > 0 and float(attn.v_scale) > 0


def test_float32_dequantization_is_exact(checkpoints):
    """bfloat16 scales: the library's `dequantize=True` load multiplies in bfloat16 (weights off by
    an ulp of bf16, logits by ~1e-3); ours gives codes x scale exactly in float32."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from raycompress.models.load import load_causal_lm

    folder, ref = checkpoints("W4A16", False)
    ours = load_causal_lm(folder, torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                  quantization_config=CompressedTensorsConfig(dequantize=True))
    assert torch.equal(_logits(ours), ref) and not torch.equal(_logits(theirs), ref)


@pytest.mark.parametrize(("name", "kv"), [("W8A8", False), ("NVFP4", False), ("W4A16", True)])
def test_scoring_path_equals_the_model_forward(checkpoints, name, kv):
    """evaluation.scoring runs the decoder body and the head apart, batched and right-padded."""
    from raycompress.evaluation.scoring import _scored_logits_fn, loglikelihoods
    from raycompress.models.load import load_causal_lm

    model = load_causal_lm(checkpoints(name, kv)[0], torch.float32)
    logits_fn = _scored_logits_fn(model, IDS, [(0, IDS.shape[1])] * len(IDS))  # the logits it scores
    assert torch.equal(logits_fn(0, IDS.numel()), _logits(model).flatten(0, 1))
    requests = [(IDS[0, :5].tolist(), IDS[0, 5:].tolist()), (IDS[1, :3].tolist(), IDS[1, 3:8].tolist())]
    scored = loglikelihoods(model, requests, max_len=64)
    for (ctx, cont), (ll, _) in zip(requests, scored):
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        expected = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
        assert ll == pytest.approx(expected, abs=1e-5)


def test_bfloat16_load_and_dense_checkpoint(checkpoints, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from raycompress.models.load import load_causal_lm

    model = load_causal_lm(checkpoints("W8A8", False)[0], torch.bfloat16)
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert torch.isfinite(_logits(model)).all()
    ours, plain = load_causal_lm(tiny_llama_dir, torch.float32), AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), plain.state_dict().values()))


def test_kv_cache_of_a_generating_model_holds_fp8_grid_values(checkpoints):
    """With the model's own DynamicCache (use_cache), the cache still fills, with the keys and values
    quantize-dequantized: each is a float8_e4m3 value times the layer's k_scale / v_scale."""
    from raycompress.models.load import load_causal_lm

    model = load_causal_lm(checkpoints("W4A16", True)[0], torch.float32)
    with torch.no_grad():
        cache = model(IDS, use_cache=True).past_key_values
    assert cache.get_seq_length() == IDS.shape[1]
    for i, layer in enumerate(model.model.layers):
        for states, scale in ((cache.layers[i].keys, layer.self_attn.k_scale),
                              (cache.layers[i].values, layer.self_attn.v_scale)):
            codes = states / scale  # within an ulp of float8 values, whose spacing is >= 2^-9 here
            torch.testing.assert_close(codes, codes.to(torch.float8_e4m3fn).float(), rtol=1e-6, atol=0)
            assert codes.abs().max() <= 448 * (1 + 1e-6)  # clamped to float8_e4m3's range


@pytest.mark.parametrize("device_map", ["auto", "cpu", "disk"])
def test_device_maps_with_offloading(checkpoints, device_map, tmp_path):
    """`evaluate.device_map`: accelerate places the dequantized model, a layer offloaded to disk too."""
    from raycompress.evaluation.scoring import _input_device
    from raycompress.models.load import load_causal_lm

    folder, ref = checkpoints(*(("W4A16", True) if device_map == "disk" else ("W8A8", False)))
    if device_map == "disk":  # the KV checkpoint: k_scale / v_scale offloaded with their attention
        device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                      "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    model = load_causal_lm(folder, torch.float32, device_map=device_map, offload_folder=str(tmp_path))
    assert torch.equal(_logits(model), ref) and _input_device(model) == torch.device("cpu")
    if isinstance(device_map, dict):
        assert model.model.layers[1].mlp.up_proj.weight.device == torch.device("meta")  # on disk until run
