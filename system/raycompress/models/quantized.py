"""Quantized checkpoints in the compressed-tensors formats that transformers (with compressed-tensors
installed) and vLLM load, for the compressed-tensors preset schemes (W4A16, W4A16_ASYM, W8A16, W8A8,
FP8, FP8_DYNAMIC, NVFP4, NVFP4A16) and our legacy `QuantConfig`, with an optional FP8 KV cache.

`resolve` is the one place that maps a recipe to a format: a `Scheme` holds the compressed-tensors
QuantizationScheme (targets ["Linear"]), the kv_cache_scheme, the format compressed-tensors infers for
it (`compressors.format.infer_module_format`: pack-quantized for integer weight-only, int-quantized
for W8A8, float-quantized for FP8, nvfp4-pack-quantized for NVFP4) and the `QuantSpec` the solvers
round on. Per linear the checkpoint stores what that format's compressor writes: pack-quantized
`weight_packed` (int32, 32 / bits codes a word), `weight_shape`, `weight_scale` (d_out, n_groups)
and, when asymmetric, `weight_zero_point` packed along d_out (int32, (ceil(d_out * bits / 32),
n_groups)); int- / float-quantized `weight` (int8 / float8_e4m3fn) and `weight_scale` ((d_out, 1) per
channel, (1,) per tensor); nvfp4-pack-quantized `weight_packed` (uint8, two E2M1 codes a byte),
`weight_scale` (d_out, d_in / 16) float8_e4m3fn and `weight_global_scale` (1,) float32. Static
activations add `input_scale` (1,) in the model dtype (FP8) or `input_global_scale` (1,) float32
(NVFP4); an FP8 KV cache adds `k_scale` / `v_scale` (1,) in the model dtype on the attention module.
Packing and unpacking are done by the compressed-tensors library itself; config.json's block is
written as `ModelCompressor.update_config` writes it.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from raycompress.algorithms.quant import QuantSpec  # the grid type the solvers round on
from raycompress.config import SCHEMES, CompressConfig, QuantConfig

log = logging.getLogger(__name__)
_TYPES = {("int", 4): "int", ("int", 8): "int", ("float", 8): "fp8", ("float", 4): "fp4"}
_FP8_MAX = 448.0  # largest float8_e4m3fn value
_DROPPED_ON_UNPACK = ("input_scale", "input_global_scale", "input_zero_point", "k_scale", "v_scale",
                      "k_zero_point", "v_zero_point")


@dataclass(frozen=True)
class Scheme:
    """How one recipe quantizes: name (preset name, or "legacy" for a QuantConfig), ct (the
    compressed-tensors QuantizationScheme, targets ["Linear"], format set), kv (the
    kv_cache_scheme QuantizationArgs or None), format (the compressed-tensors format string),
    weight_spec (the grid the solvers round on), act_order (GPTQ activation order, static groups)."""

    name: str
    ct: Any
    kv: Any
    format: str
    weight_spec: QuantSpec
    act_order: bool = False

    def __hash__(self) -> int:  # the compressed-tensors models are not hashable; their JSON is
        return hash((self.name, self.format, self.weight_spec, self.act_order, self.ct.model_dump_json(),
                     None if self.kv is None else self.kv.model_dump_json()))

    @property
    def activations(self):
        """The input activations' QuantizationArgs, None for weight-only schemes."""
        return self.ct.input_activations

    @property
    def static_inputs(self) -> bool:
        """Whether the input activations need a calibrated value (FP8's static input_scale,
        NVFP4's input_global_scale): `input_qparams` then returns it."""
        act = self.activations
        return act is not None and act.dynamic in (False, "local")


def _weight_spec(args) -> QuantSpec:
    """The QuantSpec of compressed-tensors weight QuantizationArgs (int / fp8 / NVFP4)."""
    kind = _TYPES.get((args.type, args.num_bits))
    if kind is None or args.strategy not in ("group", "channel", "tensor", "tensor_group"):
        raise ValueError(f"unsupported weight quantization {args.type} {args.num_bits} bits {args.strategy}")
    grouped = args.strategy in ("group", "tensor_group")
    return QuantSpec(bits=args.num_bits, symmetric=args.symmetric, group_size=args.group_size if grouped else None,
                     type=kind, tensor=args.strategy == "tensor")


def _build(name: str, ct, kv, act_order: bool = False) -> Scheme:
    from compressed_tensors.compressors.format import infer_module_format

    fmt = ct.format or infer_module_format(torch.nn.Linear, ct).value
    ct = ct.model_copy(update={"format": fmt})
    return Scheme(name, ct, kv, fmt, _weight_spec(ct.weights), act_order)


def kv_cache_args():
    """The kv_cache_scheme of an FP8 (E4M3) KV cache with one static scale per tensor, as
    llm-compressor's examples write it."""
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=8, type="float", strategy="tensor", dynamic=False, symmetric=True)


def _legacy(q: QuantConfig, kv=None) -> Scheme:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=q.bits, type="int", symmetric=q.symmetric,
                            strategy="group" if q.group_size else "channel", group_size=q.group_size,
                            actorder="static" if q.act_order else None)
    return _build("legacy", QuantizationScheme(targets=["Linear"], weights=args, format="pack-quantized"), kv,
                  q.act_order)


def resolve(cfg: CompressConfig) -> Scheme | None:
    """The Scheme of a recipe: cfg.scheme (a preset name or alias, `config.SCHEMES`) or the legacy
    cfg.quant (integer, bits, symmetric, group or channel, actorder static with act_order), plus
    cfg.kv_cache as an FP8 per-tensor kv_cache_scheme; None when cfg does not quantize."""
    if not cfg.quantized:
        return None
    kv = kv_cache_args() if cfg.kv_cache is not None else None
    if cfg.quant is not None:
        return _legacy(cfg.quant, kv)
    from compressed_tensors.quantization import preset_name_to_scheme

    name = SCHEMES[cfg.scheme.upper()]
    return _build(name, preset_name_to_scheme(name, ["Linear"]), kv)


def qparams(result, scheme, dtype) -> dict[str, torch.Tensor]:
    """A solved linear's weight parameters as the checkpoint stores them (they travel between
    workers no wider): `weight_scale` ((d_out, n_groups), (d_out, 1) per channel, (1,) per tensor)
    in `dtype` (float8_e4m3fn for NVFP4), `weight_zero_point` (d_out, n_groups) int8 when
    asymmetric (packed by `pack`), `weight_global_scale` (1,) float32 for NVFP4.

    result: a QuantResult, GPTQResult or SparseGPTResult (its scale / zero (d_out, n_groups)
    float32; global_scale (1,) float32, needed for NVFP4 only).
    """
    spec = scheme.weight_spec
    scale = result.scale[:1, :1].reshape(1) if spec.tensor else result.scale
    if spec.type == "fp4":
        return {"weight_scale": scale.to(torch.float8_e4m3fn),
                "weight_global_scale": getattr(result, "global_scale").to(torch.float32).reshape(1)}
    out = {"weight_scale": scale.to(dtype)}
    if not torch.equal(out["weight_scale"].float(), scale.float()):
        log.warning("weight_scale is not representable in %s: the weight was rounded with another scale than "
                    "the one stored (solve with QuantSpec.weight_dtype=%s)", dtype, dtype)
    if not spec.symmetric:
        out["weight_zero_point"] = result.zero.to(torch.int8)
    return out


def input_qparams(absmax: torch.Tensor, scheme: Scheme, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The calibrated input parameters of one linear from absmax (d_in,) float32, the per-channel
    max |x| of its input over the calibration set: {"input_scale": max / 448, (1,) in dtype} for
    FP8's static per-tensor activations, {"input_global_scale": 448 * 6 / max, (1,) float32} for
    NVFP4 (compressed-tensors `calculate_qparams` / `generate_gparam` on that max, in dtype), {} for
    dynamic or weight-only activations. A zero max gives the dtype's eps as scale (global scale 1)."""
    if not scheme.static_inputs:
        return {}
    amax = absmax.detach().float().max().reshape(1)
    act = scheme.activations
    if act.type == "float" and act.num_bits == 4:
        from compressed_tensors.quantization.utils import generate_gparam

        return {"input_global_scale": generate_gparam(-amax.to(dtype), amax.to(dtype))}
    return {"input_scale": _fp8_tensor_scale(float(amax), dtype)}


def _fp8_tensor_scale(absmax: float, dtype: torch.dtype) -> torch.Tensor:
    """max / 448 computed in dtype, shape (1,); 0 -> dtype eps (compressed-tensors `calculate_qparams`)."""
    scale = torch.tensor([abs(absmax)], dtype=torch.float32).to(dtype) / _FP8_MAX
    return torch.where(scale == 0, torch.full_like(scale, torch.finfo(dtype).eps), scale)


def kv_qparams(k_absmax: float, v_absmax: float, scheme: Scheme, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """An FP8 KV cache's per-tensor scales of one attention module: {"k_scale", "v_scale"}, each
    max |k| / 448 (resp. v) as (1,) tensors in dtype (names relative to the attention module);
    {} without a kv_cache_scheme."""
    if scheme.kv is None:
        return {}
    return {"k_scale": _fp8_tensor_scale(k_absmax, dtype), "v_scale": _fp8_tensor_scale(v_absmax, dtype)}


def _n_groups(d_in: int, spec: QuantSpec) -> int:
    return d_in // spec.group_size if spec.group_size else 1


def qparam_bytes(d_out: int, d_in: int, scheme, dtype: torch.dtype) -> int:
    """Bytes of one (d_out, d_in) linear's `qparams` as they travel between workers (zero points
    unpacked, int8) plus its static input parameters: scales d_out x n_groups in dtype (one per
    tensor: 1; NVFP4: 1 byte each plus a 4-byte global scale), zero points 1 byte each when
    asymmetric. `scheme`: a Scheme (`resolve`)."""
    spec = scheme.weight_spec
    n = 1 if spec.tensor else d_out * _n_groups(d_in, spec)
    if spec.type == "fp4":
        total = n + 4
    else:
        total = n * dtype.itemsize + (0 if spec.symmetric else n)
    if scheme.static_inputs:
        total += 4 if scheme.activations.num_bits == 4 else dtype.itemsize
    return total


def weight_bytes(d_out: int, d_in: int, scheme, dtype: torch.dtype) -> int:
    """Bytes of one (d_out, d_in) linear's stored weight: pack-quantized d_out x ceil(d_in * bits
    / 32) int32 words (+ a 2-element int64 weight_shape), int-/float-quantized one byte a value,
    NVFP4 half a byte a value. `dtype` is unused (kept for a uniform signature)."""
    spec = scheme.weight_spec
    if scheme.format == "pack-quantized":
        return d_out * math.ceil(d_in * spec.bits / 32) * 4 + 16
    if spec.type == "fp4":
        return d_out * d_in // 2
    return d_out * d_in


def _compressor(scheme: Scheme):
    from compressed_tensors.compressors import BaseCompressor

    return BaseCompressor.get_value_from_registry(scheme.format)


def pack(tensors: dict[str, torch.Tensor], scheme, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One linear's stored state dict (names without the module prefix) from {weight (dequantized
    (d_out, d_in), float32 or the model dtype), weight_scale, [weight_zero_point],
    [weight_global_scale], [input_scale], [input_global_scale]} (as `qparams` / `input_qparams`
    give them), by compressed-tensors' own compressor for the scheme's format."""
    state = dict(tensors)
    state["weight"] = tensors["weight"].float()
    if scheme.weight_spec.type == "fp4":  # the compressor quantizes with a float scale, then stores it as FP8
        state["weight_scale"] = tensors["weight_scale"].float()
    else:
        state["weight_scale"] = tensors["weight_scale"].to(dtype)
    if "weight_zero_point" in tensors:
        state["weight_zero_point"] = tensors["weight_zero_point"].to(torch.int8)
    return {k: v.contiguous() for k, v in _compressor(scheme).compress(state, scheme.ct).items()}


def _unpack_nvfp4(local: dict[str, torch.Tensor], scheme: Scheme) -> torch.Tensor:
    """NVFP4 dequantized in float32 (the library's decompressor rounds to bfloat16 first)."""
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    packed = local["weight_packed"]
    codes = unpack_fp4_from_uint8(packed, packed.shape[0], packed.shape[1] * 2, dtype=torch.float32)
    return dequantize(codes, local["weight_scale"].float(), args=scheme.ct.weights,
                      global_scale=local["weight_global_scale"].float(), dtype=torch.float32)


def unpack(state: dict[str, torch.Tensor], scheme) -> dict[str, torch.Tensor]:
    """A layer state dict with its quantized linears turned back into dequantized `<name>.weight`
    (float32, exactly the values the checkpoint holds; the caller casts), other tensors as they are;
    input activation, KV-cache and global-scale parameters are dropped."""
    names = [k[: -len(".weight_scale")] for k in state if k.endswith(".weight_scale")]
    out = {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] not in _DROPPED_ON_UNPACK}
    for name in names:
        local = {k[len(name) + 1:]: v for k, v in state.items()
                 if k.startswith(name + ".") and k[len(name) + 1:].startswith("weight")}
        for k in local:
            out.pop(f"{name}.{k}", None)
        if scheme.format == "nvfp4-pack-quantized":
            out[f"{name}.weight"] = _unpack_nvfp4(local, scheme)
        else:
            out[f"{name}.weight"] = _compressor(scheme).decompress(local, scheme.ct)["weight"].float()
    return out


def quantization_config(scheme, ignore: list[str]) -> dict:
    """config.json's `quantization_config` block as compressed-tensors writes it
    (`ModelCompressor.update_config`): version, quant_method, sparsity_config {}, transform_config
    {}, then the QuantizationConfig (config_groups {"group_0": scheme}, kv_cache_scheme, format,
    quantization_status "compressed", ignore, ...), JSON-ready."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig
    cfg = QuantizationConfig(config_groups={"group_0": scheme.ct}, kv_cache_scheme=scheme.kv, format=scheme.format,
                             quantization_status="compressed", ignore=list(ignore))
    return {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors",
            "sparsity_config": {}, "transform_config": {},
            **cfg.model_dump(mode="json", exclude={"quant_method"})}
