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


def pack_quantized(tensors: dict[str, torch.Tensor], q: QuantConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """{weight (dequantized, d_out x d_in), weight_scale, weight_zero_point (d_out, n_groups)} ->
    the packed state dict of one linear (names without the module prefix)."""
    from compressed_tensors.compressors import PackedQuantizationCompressor

    state = {"weight": tensors["weight"].float(), "weight_scale": tensors["weight_scale"].to(dtype),
             "weight_zero_point": tensors["weight_zero_point"].to(torch.int8)}
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
