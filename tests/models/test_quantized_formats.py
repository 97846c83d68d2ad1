"""models.quantized for every compressed-tensors preset we write: a tiny Llama quantized with RTN,
packed by `pack`, with made-up input / KV-cache scales, loads in stock transformers with exactly
the stored names, and its dequantized weights are exactly ours; `unpack(pack(...))` round-trips.

Loading options (transformers 5.25, compressed-tensors 0.20):
- default (`dequantize=False`): compressed-tensors builds each quantized module's parameters
  (weight_packed / weight, weight_scale, input_scale, input_global_scale, weight_global_scale) and
  decompresses the weights on the first forward. This is the faithful key check: a name, shape or
  dtype it does not expect is reported (unexpected / mismatched). Two library limits: (1) it does
  not see Llama's attention as a cached attention (transformers 5 renamed `past_key_values` to
  `cache`, which `is_cached_attention_module` looks for), so k_scale / v_scale are unexpected
  unless that check is taught the new name (done here with monkeypatch: then they load with no
  unexpected key); (2) an asymmetric zero point is expected unpacked (d_out, n_groups), because
  the placeholder is compressed on the meta device where the pack-quantized compressor does not
  pack zero points, while the decompressor needs them packed: no checkpoint loads there.
- `CompressedTensorsConfig(dequantize=True)` (what `load_causal_lm` uses): the compressor's own
  decompress on load; activation and KV-cache scales are then unexpected (dropped), and the
  packed asymmetric zero point (as llm-compressor writes it and vLLM reads it) loads exactly.
"""
import inspect
import json
import pickle
from dataclasses import replace

import pytest
import torch

from raycompress.algorithms.quant import rtn
from raycompress.config import SCHEMES, CompressConfig
from raycompress.models import quantized as Q

pytest.importorskip("compressed_tensors")
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM, CompressedTensorsConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

PRESETS = sorted(set(SCHEMES.values()))
CASES = [(n, torch.bfloat16, False) for n in PRESETS] + [("W4A16", torch.bfloat16, True)] + \
    [(n, torch.float32, False) for n in PRESETS if not n.startswith("NVFP4")]  # NVFP4: see test_nvfp4_float32
RUNTIME_KEYS = ("input_scale", "input_global_scale", "k_scale", "v_scale")


def _scheme(name: str, kv: bool) -> Q.Scheme:
    """The preset's Scheme, with integer groups of 32 (the tiny model's d_in is 64 or 128)."""
    s = Q.resolve(CompressConfig(algorithm="rtn", scheme=name, kv_cache={} if kv else None))
    if s.weight_spec.type == "int" and s.weight_spec.group_size:
        weights = s.ct.weights.model_copy(update={"group_size": 32})
        s = replace(s, ct=s.ct.model_copy(update={"weights": weights}), weight_spec=replace(s.weight_spec, group_size=32))
    return s


def _write(folder, scheme: Q.Scheme, dtype: torch.dtype):
    """A tiny random Llama, every decoder linear RTN-quantized and packed, into folder; returns
    ({linear weight name: our dequantized float32 weight}, {stored name: tensor})."""
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, head_dim=16)
    model = LlamaForCausalLM(cfg).to(dtype)
    ours, state = {}, {}
    g = torch.Generator().manual_seed(1)
    for name, p in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if ".layers." in name and name.endswith("proj.weight"):
            r = rtn(p, scheme.weight_spec)
            absmax = torch.rand(p.shape[1], generator=g) * 5
            tensors = {"weight": r.weight.to(dtype), **Q.qparams(r, scheme, dtype), **Q.input_qparams(absmax, scheme, dtype)}
            ours[name] = r.weight
            state.update({f"{module}.{k}": v for k, v in Q.pack(tensors, scheme, dtype).items()})
        else:
            state[name] = p.contiguous()
    for i in range(cfg.num_hidden_layers):
        state.update({f"model.layers.{i}.self_attn.{k}": v for k, v in Q.kv_qparams(3.0 + i, 5.0, scheme, dtype).items()})
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    conf = {**cfg.to_dict(), "architectures": ["LlamaForCausalLM"], "dtype": str(dtype).removeprefix("torch.")}
    conf["quantization_config"] = Q.quantization_config(scheme, ["lm_head"])
    (folder / "config.json").write_text(json.dumps(conf))
    return ours, state


def _teach_cached_attention(monkeypatch):
    """compressed-tensors 0.20 recognises a cached attention by a `past_key_values` argument;
    transformers 5 calls it `cache`."""
    from compressed_tensors.quantization.lifecycle import apply, initialize

    orig = initialize.is_cached_attention_module

    def cached(module):
        return orig(module) or (initialize._is_attention_module(module)
                                and "cache" in inspect.signature(module.forward).parameters)

    monkeypatch.setattr(apply, "is_cached_attention_module", cached)
    monkeypatch.setattr(initialize, "is_cached_attention_module", cached)


def _problems(info: dict) -> dict:
    return {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}


def _assert_same_weights(model, ours: dict, dtype):
    sd = model.state_dict()
    for name, w in ours.items():
        assert sd[name].dtype == dtype and torch.equal(sd[name], w.to(dtype)), name


@pytest.mark.parametrize("name,dtype,kv", CASES, ids=lambda v: str(v).removeprefix("torch."))
def test_checkpoint_loads_in_transformers(tmp_path, monkeypatch, name, dtype, kv):
    scheme = _scheme(name, kv)
    ours, state = _write(tmp_path, scheme, dtype)
    conf = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert conf["format"] == scheme.format and conf["quantization_status"] == "compressed"
    assert conf["sparsity_config"] == {} and conf["transform_config"] == {} and conf["version"]
    assert (conf["kv_cache_scheme"] is not None) == kv
    # unpack (resume replay) gives back exactly the weights the solver used, once cast to the model dtype
    unpacked = Q.unpack(state, scheme)
    assert not [k for k in unpacked if k.rsplit(".", 1)[-1] in RUNTIME_KEYS + ("weight_scale",)]
    for n, w in ours.items():
        assert unpacked[n].dtype == torch.float32 and torch.equal(unpacked[n].to(dtype), w.to(dtype)), n

    if scheme.weight_spec.symmetric:  # default path: every stored name, shape and dtype is expected
        _teach_cached_attention(monkeypatch)
        model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True, dtype=dtype)
        assert not _problems(info)
        if kv:
            attn = model.model.layers[1].self_attn
            assert torch.equal(attn.k_scale.data, state["model.layers.1.self_attn.k_scale"])
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]))  # compressed-tensors decompresses on the first forward
        _assert_same_weights(model, ours, dtype)
        monkeypatch.undo()

    model, info = AutoModelForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True, dtype=dtype, quantization_config=CompressedTensorsConfig(dequantize=True))
    problems = _problems(info)
    assert set(problems) <= {"unexpected_keys"}
    assert all(k.rsplit(".", 1)[-1] in RUNTIME_KEYS for k in problems.get("unexpected_keys", ()))
    _assert_same_weights(model, ours, dtype)


def test_nvfp4_float32(tmp_path):
    """NVFP4 in a float32 model: `unpack` is exact in float32, while compressed-tensors 0.20's
    decompressor rounds NVFP4 weights to bfloat16 (and its default forward path fails on float32)."""
    scheme = _scheme("NVFP4A16", False)
    ours, state = _write(tmp_path, scheme, torch.float32)
    unpacked = Q.unpack(state, scheme)
    assert all(torch.equal(unpacked[n], w) for n, w in ours.items())
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
    sd = model.state_dict()
    assert all(torch.equal(sd[n], w.bfloat16().float()) for n, w in ours.items())


@pytest.mark.parametrize("name", PRESETS)
def test_qparam_and_weight_bytes_match_what_is_stored(name):
    scheme = _scheme(name, False)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(2)).bfloat16()
    r = rtn(w, scheme.weight_spec)
    qp = {**Q.qparams(r, scheme, torch.bfloat16), **Q.input_qparams(torch.ones(128), scheme, torch.bfloat16)}
    assert Q.qparam_bytes(64, 128, scheme, torch.bfloat16) == sum(t.numel() * t.element_size() for t in qp.values())
    packed = Q.pack({"weight": r.weight, **qp}, scheme, torch.bfloat16)
    stored = {k: v for k, v in packed.items() if k in ("weight", "weight_packed", "weight_shape")}
    assert Q.weight_bytes(64, 128, scheme, torch.bfloat16) == sum(t.numel() * t.element_size() for t in stored.values())


def test_resolve_legacy_and_presets():
    assert Q.resolve(CompressConfig(algorithm="magnitude")) is None
    for name in PRESETS:  # a Scheme travels to Ray workers
        s = Q.resolve(CompressConfig(algorithm="rtn", scheme=name, kv_cache={}))
        copy = pickle.loads(pickle.dumps(s))
        assert copy == s and hash(copy) == hash(s) and s.name == name
    legacy = Q.resolve(CompressConfig(algorithm="gptq", quant={"bits": 8, "group_size": None, "act_order": True}))
    assert legacy.name == "legacy" and legacy.format == "pack-quantized" and legacy.act_order
    assert legacy.ct.weights.strategy == "channel" and legacy.ct.weights.actorder == "static"
    w8a8 = Q.resolve(CompressConfig(algorithm="gptq", scheme="int8", kv_cache={}))
    assert w8a8.name == "W8A8" and w8a8.format == "int-quantized" and not w8a8.static_inputs
    assert w8a8.kv.type == "float" and w8a8.kv.num_bits == 8 and w8a8.kv.strategy == "tensor" and not w8a8.kv.dynamic
    fp8 = Q.resolve(CompressConfig(algorithm="rtn", scheme="FP8"))
    assert fp8.static_inputs and fp8.weight_spec.tensor and fp8.format == "float-quantized"
    nv = Q.resolve(CompressConfig(algorithm="rtn", scheme="nvfp4"))
    assert nv.static_inputs and nv.weight_spec.type == "fp4" and nv.format == "nvfp4-pack-quantized"
    assert Q.kv_qparams(1.0, 2.0, nv, torch.bfloat16) == {}
    kv = Q.kv_qparams(448.0, 0.0, w8a8, torch.bfloat16)
    assert kv["k_scale"].tolist() == [1.0] and kv["v_scale"].item() == torch.finfo(torch.bfloat16).eps
    assert Q.input_qparams(torch.tensor([0.5, 6.0]), nv, torch.float32)["input_global_scale"].tolist() == [448.0]


def test_qparams_warns_when_the_stored_scale_is_not_the_one_used(caplog):
    scheme = _scheme("W4A16", False)
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    with caplog.at_level("WARNING", logger="raycompress.models.quantized"):
        Q.qparams(rtn(w.bfloat16(), scheme.weight_spec), scheme, torch.bfloat16)  # scales solved in bf16
        assert not caplog.records
        Q.qparams(rtn(w, scheme.weight_spec), scheme, torch.bfloat16)  # float32 scales stored as bf16
    assert "not representable" in caplog.text


@pytest.mark.parametrize("name", PRESETS)
def test_gptq_weights_round_trip_through_the_checkpoint(name):
    """GPTQ's compensated weights are on their grids: packed and unpacked they come back exactly."""
    from raycompress.algorithms.gptq import gptq_quantize

    scheme = _scheme(name, False)
    g = torch.Generator().manual_seed(4)
    w = torch.randn(32, 64, generator=g).bfloat16()
    x = torch.randn(64, 256, generator=g)
    r = gptq_quantize(w, x @ x.T, scheme.weight_spec, block_size=32)
    packed = Q.pack({"weight": r.weight, **Q.qparams(r, scheme, torch.bfloat16)}, scheme, torch.bfloat16)
    back = Q.unpack({f"proj.{k}": v for k, v in packed.items()}, scheme)["proj.weight"]
    assert torch.equal(back.bfloat16(), r.weight)
