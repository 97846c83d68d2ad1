"""Quantized weights in the compressed-tensors `pack-quantized` format, which transformers (with
compressed-tensors installed) and vLLM load: per linear `weight_packed` (int32, 8 int4 or 4 int8
codes per word), `weight_scale` (d_out, n_groups), `weight_shape`, and `weight_zero_point` when
asymmetric; plus the `quantization_config` block of config.json. Packing is done by the
compressed-tensors library itself.
"""
from __future__ import annotations

import torch

from raycompress.config import QuantConfig


def scheme(q: QuantConfig):
    """The compressed-tensors QuantizationScheme for our QuantConfig (weights only)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=q.bits, type="int", symmetric=q.symmetric,
                            strategy="group" if q.group_size else "channel", group_size=q.group_size,
                            actorder="static" if q.act_order else None)
    return QuantizationScheme(targets=["Linear"], weights=args, format="pack-quantized")


def qparams(scale: torch.Tensor, zero: torch.Tensor, q: QuantConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A quantized linear's parameters as the checkpoint keeps them, so they travel between
    workers no wider than they are written: `weight_scale` (d_out, n_groups) in the checkpoint's
    dtype, and `weight_zero_point` (d_out, n_groups) int8 only when asymmetric (a symmetric zero
    point is 0 and is not written)."""
    out = {"weight_scale": scale.to(dtype)}
    if not q.symmetric:
        out["weight_zero_point"] = zero.to(torch.int8)
    return out


def qparam_bytes(d_out: int, d_in: int, q: QuantConfig, dtype: torch.dtype) -> int:
    """Bytes of one (d_out, d_in) linear's `qparams`: per output row and group, one scale in
    `dtype` plus one int8 zero point when asymmetric; n_groups = d_in / group_size (1 per channel)."""
    n_groups = d_in // q.group_size if q.group_size else 1
    return d_out * n_groups * (dtype.itemsize + (0 if q.symmetric else 1))


def pack_quantized(tensors: dict[str, torch.Tensor], q: QuantConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """{weight (dequantized, d_out x d_in), weight_scale, weight_zero_point if asymmetric
    (d_out, n_groups)} -> the packed state dict of one linear (names without the module prefix)."""
    from compressed_tensors.compressors import PackedQuantizationCompressor

    state = {"weight": tensors["weight"].float(), "weight_scale": tensors["weight_scale"].to(dtype)}
    if "weight_zero_point" in tensors:
        state["weight_zero_point"] = tensors["weight_zero_point"].to(torch.int8)
    return {k: v.contiguous() for k, v in PackedQuantizationCompressor.compress(state, scheme(q)).items()}


def quantization_config(q: QuantConfig, ignore: list[str]) -> dict:
    """The config.json `quantization_config` block for a pack-quantized checkpoint."""
    from compressed_tensors.quantization import QuantizationConfig

    cfg = QuantizationConfig(config_groups={"group_0": scheme(q)}, format="pack-quantized",
                             quantization_status="compressed", ignore=ignore)
    return cfg.model_dump(mode="json", exclude_none=False)


def unpack_quantized(state: dict[str, torch.Tensor], q: QuantConfig) -> dict[str, torch.Tensor]:
    """A layer state dict with packed linears turned back into dequantized `<name>.weight`."""
    from compressed_tensors.compressors import PackedQuantizationCompressor

    out = {k: v for k, v in state.items() if not k.rsplit(".", 1)[-1].startswith("weight_")}
    for key in [k for k in state if k.endswith(".weight_packed")]:
        name = key[: -len(".weight_packed")]
        local = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".weight_")}
        out[f"{name}.weight"] = PackedQuantizationCompressor.decompress(local, scheme(q))["weight"]
    return out


def load_causal_lm(folder, dtype: torch.dtype, **kwargs):
    """`folder` as an eval-mode transformers causal LM in `dtype` whose linears all hold a dense
    `weight` (what `evaluation.scoring` runs: the decoder body and the output head apart).

    A compressed-tensors checkpoint (our `pack-quantized` output, or llm-compressor's) is
    dequantized as it loads. Loaded as is, transformers 5 with compressed-tensors keeps each
    quantized linear packed (`weight_packed`, `weight_scale`, no `weight`) and unpacks them in a
    forward pre-hook of the top-level model only, which the scorer never calls. `kwargs` go to
    `from_pretrained` (device_map, offload_folder); `trust_remote_code` is always False.

    Raises:
        RuntimeError: a linear is still packed after loading (a transformers / compressed-tensors
            pair whose loading options differ from these).
    """
    import inspect

    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {**kwargs, "dtype": dtype, "trust_remote_code": False}
    quant = getattr(AutoConfig.from_pretrained(folder, trust_remote_code=False), "quantization_config", None) or {}
    if (quant if isinstance(quant, dict) else quant.to_dict()).get("quant_method") == "compressed-tensors":
        from transformers import CompressedTensorsConfig

        # `dequantize` replaced `run_compressed` (its opposite) in transformers 5
        new_api = "dequantize" in inspect.signature(CompressedTensorsConfig).parameters
        kwargs["quantization_config"] = CompressedTensorsConfig(**({"dequantize": True} if new_api
                                                                   else {"run_compressed": False}))
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    packed = [name for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)
              and not isinstance(getattr(mod, "weight", None), torch.Tensor)]
    if packed:
        raise RuntimeError(f"{folder}: {len(packed)} linears still packed after loading (first: {packed[0]})")
    return model
