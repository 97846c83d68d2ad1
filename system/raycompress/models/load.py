"""Loading a causal LM for evaluation: a compressed-tensors checkpoint runs the way compressed-tensors
itself runs it fake-quantized, in every module's own forward.

transformers (with compressed-tensors installed, `dequantize=False`) builds a quantized model as
compressed-tensors' lifecycle does: `apply_quantization_config` attaches each linear's
`quantization_scheme` and wraps its forward (`set_forward_quantized`: quantize-dequantize of the
input activations, dynamic per token or static from `input_scale` / `input_global_scale`), keeps the
weights packed, and unpacks them in a forward pre-hook of the top-level model only. Here the weights
are unpacked at load instead (in float32, then cast: the library's own unpacking of a bfloat16 scale
or of NVFP4 runs in bfloat16), so the decoder layers and submodules the scorer calls one by one
already hold dense weights while their forwards keep the activation quantization.

An FP8 KV cache (`kv_cache_scheme`) is attached with compressed-tensors' `QuantizedKVCache` (quantize-
dequantize of the key and value states as they are cached: after RoPE and k_norm) and the per-tensor
`k_scale` / `v_scale` of each attention module. compressed-tensors 0.20 attaches it only to attention
modules whose forward takes `past_key_values`; transformers 5 renamed that argument `cache`, so the
library skips every attention module (KV quantization silently off). `hook_kv_cache` routes the
argument by whichever name the module's forward takes.

The result equals, bit for bit in float32, the logits of the in-memory model the checkpoint was
compressed from, run by compressed-tensors in status FROZEN (tests/models/test_load.py), and those
of stock transformers' own `dequantize=False` load where that runs (not float32 NVFP4, whose
unpacking to bfloat16 then fails in the float32 matmul; not the KV cache, which it ignores).
With a `device_map` the dequantized model is placed by accelerate afterwards (`_dispatch`).
"""
from __future__ import annotations

import inspect
import logging
import warnings

import torch
from torch import nn

log = logging.getLogger(__name__)

_DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's
_CACHE_ARGS = ("cache", "past_key_values", "past_key_value")  # transformers 5, 4.56+, older


def _ct_config(folder) -> dict | None:
    """config.json's `quantization_config` when its method is compressed-tensors, else None."""
    from transformers import AutoConfig

    quant = getattr(AutoConfig.from_pretrained(folder, trust_remote_code=False), "quantization_config", None) or {}
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    return quant if quant.get("quant_method") == "compressed-tensors" else None


def load_causal_lm(folder, dtype: torch.dtype, **kwargs):
    """`folder` as an eval-mode transformers causal LM in `dtype` whose linears all hold a dense
    `weight` (what `evaluation.scoring` runs: the decoder body and the output head apart).

    A compressed-tensors checkpoint (ours, or llm-compressor's) keeps its quantization scheme on
    every quantized module: weights are dequantized at load (exactly, in float32, then cast to
    `dtype`), input activations are quantize-dequantized in each linear's own forward (W8A8, FP8,
    FP8_DYNAMIC, NVFP4 ...), and with a `kv_cache_scheme` the key / value states in each attention
    module's forward (`hook_kv_cache`). A dense checkpoint loads unchanged. `kwargs` go to
    `from_pretrained` (device_map, offload_folder); `trust_remote_code` is always False.

    Raises:
        RuntimeError: a linear is still packed after loading (a transformers / compressed-tensors
            pair whose loading options differ from these).
        KeyError: `kv_cache_scheme` is set but an attention module's static k_scale / v_scale is
            not in the checkpoint.
    """
    from transformers import AutoModelForCausalLM

    kwargs = {**kwargs, "dtype": dtype, "trust_remote_code": False}
    quant = _ct_config(folder)
    placement = {k: kwargs.pop(k, None) for k in ("device_map", "offload_folder", "max_memory")} if quant else {}
    if quant is not None:
        from transformers import CompressedTensorsConfig

        # the quantized modules, weights packed: compressed-tensors' own fake-quantized forwards
        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=False, use_optimized_inference=False)
    with warnings.catch_warnings():  # "loading attributes will be overwritten with the ones you passed": meant
        warnings.filterwarnings("ignore", message="You passed `quantization_config`", category=UserWarning)
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    if quant is not None:
        _decompress(model, dtype)
        if quant.get("kv_cache_scheme"):
            _quantize_kv_cache(model, folder, quant["kv_cache_scheme"])
        if placement["device_map"] is not None:
            model = _dispatch(model, dtype, **placement)
    packed = [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)
              and not isinstance(getattr(mod, "weight", None), torch.Tensor)]
    if packed:
        raise RuntimeError(f"{folder}: {len(packed)} linears still packed after loading (first: {packed[0]})")
    return model


def _dense_weight(module: nn.Module) -> dict[str, torch.Tensor]:
    """A compressed module's state with its weight dequantized in float32 by the compressor of its
    format (scales upcast first: the library dequantizes in the scale's dtype, NVFP4 in bfloat16)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    from compressed_tensors.utils import get_direct_state_dict

    scheme = module.quantization_scheme
    state = get_direct_state_dict(module)
    up = {k: v.float() if k.startswith("weight_") and v.is_floating_point() else v for k, v in state.items()}
    if scheme.format == "nvfp4-pack-quantized":
        from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

        rows, cols = up["weight_packed"].shape
        codes = unpack_fp4_from_uint8(up["weight_packed"], rows, 2 * cols, dtype=torch.float32)
        weight = dequantize(codes, up["weight_scale"], args=scheme.weights,
                            global_scale=up.get("weight_global_scale"), dtype=torch.float32)
        out = {k: v for k, v in state.items() if k != "weight_packed"}
    else:
        out = BaseCompressor.get_value_from_registry(scheme.format).decompress(up, scheme)
        weight = out.pop("weight")
        out = {k: state.get(k, v) for k, v in out.items()}  # the qparams as loaded
    out["weight"] = weight
    return out


def _decompress(model: nn.Module, dtype: torch.dtype) -> None:
    """Dequantize every compressed module in place (float32, then `dtype`); they keep their scheme
    (status DECOMPRESSED: compressed-tensors skips the weights' quantize-dequantize, still runs the
    activations'), and the top-level decompression hook goes."""
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.utils import replace_direct_state_dict

    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or scheme.weights is None or module.quantization_status != QuantizationStatus.COMPRESSED:
            continue
        if scheme.format is None:
            scheme.format = infer_module_format(type(module), scheme)
        scheme.format = CompressionFormat(scheme.format).value
        state = _dense_weight(module)
        state["weight"] = state["weight"].to(dtype)
        replace_direct_state_dict(module, state)
        module.quantization_status = QuantizationStatus.DECOMPRESSED
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.compressor.remove_decompression_hook(model)
        if quantizer.compressor.quantization_config is not None:
            quantizer.compressor.quantization_config.quantization_status = QuantizationStatus.DECOMPRESSED


def _dispatch(model: nn.Module, dtype: torch.dtype, device_map, offload_folder=None, max_memory=None) -> nn.Module:
    """The loaded (dense) model placed by accelerate as `from_pretrained(device_map=...)` would:
    "auto" / "balanced" / "balanced_low_0" / "sequential" are resolved over the available devices,
    offloading to CPU memory or `offload_folder` what does not fit. transformers cannot load a
    quantized checkpoint with `dequantize=False` straight into a disk-offloaded map (it initializes
    the packed weights as missing keys), so the model is dequantized on the CPU first: this needs
    CPU memory for the whole model in `dtype`."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if isinstance(device_map, (str, torch.device)) and str(device_map) not in _DEVICE_MAP_STRATEGIES:
        device_map = {"": str(device_map)}
    if isinstance(device_map, str):
        no_split = list(getattr(model, "_no_split_modules", None) or [])
        if device_map != "sequential":
            max_memory = get_balanced_memory(model, max_memory, no_split_module_classes=no_split, dtype=dtype,
                                             low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    return dispatch_model(model, device_map=device_map, offload_dir=offload_folder)


def cache_argument(attn: nn.Module) -> str:
    """The name under which `attn`'s forward takes the KV cache (`cache` in transformers 5).

    Raises:
        ValueError: the forward takes no cache argument (not a cached attention module).
    """
    params = inspect.signature(attn.forward).parameters
    for name in _CACHE_ARGS:
        if name in params:
            return name
    raise ValueError(f"{type(attn).__name__}.forward takes no KV cache argument (none of {_CACHE_ARGS})")


def hook_kv_cache(attn: nn.Module, config):
    """Attach compressed-tensors' `QuantizedKVCache` to attention module `attn` (as `attn.kv_cache`),
    and a forward pre-hook handing it to the forward in place of the model's cache, which it wraps:
    every key / value state the module caches (after k_norm and RoPE, before repeat_kv) passes
    through it, quantize-dequantized when `attn.quantization_scheme.input_activations` is set
    (with `attn.k_scale` / `attn.v_scale`), and through `register_key_hook` / `register_value_hook`.
    The library's own pre-hook passes the cache as `past_key_values`, which transformers 5's
    attention no longer reads.

    Args:
        config: the decoder's (text) config.
    Returns:
        the pre-hook's handle; `handle.remove()` and `del attn.kv_cache` undo it.
    Raises:
        ValueError: `attn` takes no cache argument, or already has a `kv_cache`.
    """
    from compressed_tensors.modeling import KV_CACHE_ATTR, QuantizedKVCache

    name = cache_argument(attn)
    if hasattr(attn, KV_CACHE_ATTR):
        raise ValueError(f"{type(attn).__name__} already has a {KV_CACHE_ATTR}")
    attn.register_module(KV_CACHE_ATTR, QuantizedKVCache(config, attn))

    def route(module, args, kwargs):
        found = [kwargs.pop(alias) for alias in _CACHE_ARGS if alias in kwargs]
        past = next((c for c in found if c is not None), None)  # a Cache may be falsy (len 0)
        cache = getattr(module, KV_CACHE_ATTR)
        cache.add_past_key_values(past)
        kwargs[name] = cache
        return args, kwargs

    return attn.register_forward_pre_hook(route, with_kwargs=True)


def _quantize_kv_cache(model: nn.Module, folder, kv_args: dict) -> None:
    """KV-cache quantization on every attention module compressed-tensors targets (`KV_CACHE_TARGETS`),
    with its static k_scale / v_scale (and zero points, asymmetric) read from the checkpoint."""
    from compressed_tensors.modeling import KV_CACHE_ATTR
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, QuantizationStatus
    from compressed_tensors.quantization.lifecycle.initialize import initialize_attn_qparams
    from compressed_tensors.quantization.utils import KV_CACHE_TARGETS
    from compressed_tensors.utils.match import match_named_modules
    from compressed_tensors.utils.safetensors_load import get_quantization_parameter_to_path_mapping
    from safetensors import safe_open

    args = QuantizationArgs.model_validate(kv_args)
    mapping = get_quantization_parameter_to_path_mapping(str(folder))
    config = model.config.get_text_config(decoder=True)
    count = 0
    for name, attn in match_named_modules(model, KV_CACHE_TARGETS):
        if getattr(attn, KV_CACHE_ATTR, None) is not None:
            continue  # compressed-tensors attached it itself (a transformers that passes past_key_values)
        attn.quantization_scheme = QuantizationScheme(targets=list(KV_CACHE_TARGETS), input_activations=args)
        hook_kv_cache(attn, config)
        initialize_attn_qparams(attn, attn.quantization_scheme, force_zero_point=False)
        for key in ("k_scale", "v_scale", "k_zero_point", "v_zero_point"):
            param = getattr(attn, key, None)
            if param is None:
                continue
            if f"{name}.{key}" not in mapping:
                raise KeyError(f"{folder}: kv_cache_scheme is set but {name}.{key} is not in the checkpoint")
            with safe_open(mapping[f"{name}.{key}"], framework="pt", device="cpu") as f:
                value = f.get_tensor(f"{name}.{key}")
            param.data = value.reshape(param.shape).to(param.device, param.dtype)
        attn.quantization_status = QuantizationStatus.FROZEN
        count += 1
    log.info("KV cache quantized (%s) in %d attention modules", args.type, count)
