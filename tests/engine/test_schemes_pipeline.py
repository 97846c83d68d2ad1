"""The quantization schemes through the layer pipeline (LocalBackend, no Ray) on a tiny random Llama
at widths every scheme takes (hidden 128, FFN 256): bit-identical checkpoints for 1 and 3 workers
(float64 statistics), and stock transformers loads every output with no missing or unexpected keys."""
import json

import pytest
import torch
from safetensors.torch import load_file

from raycompress.config import CompressConfig
from raycompress.engine.pipeline import LocalBackend, compress_layers
from raycompress.engine.transfer import shard_calibration
from raycompress.engine.worker import LayerWorker
from raycompress.models.weights import OffloadedModel

CASES = {
    "W4A16-GPTQ": dict(algorithm="gptq", scheme="W4A16"),
    "W4A16_ASYM-GPTQ": dict(algorithm="gptq", scheme="W4A16_ASYM"),
    "W4A16-AWQ": dict(algorithm="awq", scheme="W4A16", awq={"n_grid": 5}),
    "W8A8-INT8-SQ": dict(algorithm="gptq", scheme="W8A8-INT8", smoothquant={"alpha": 0.5}),
    "FP8": dict(algorithm="rtn", scheme="FP8"),
    "FP8_DYNAMIC": dict(algorithm="rtn", scheme="FP8_DYNAMIC"),
    "NVFP4": dict(algorithm="rtn", scheme="NVFP4"),
    "FP8-KV": dict(algorithm="gptq", scheme="W4A16", kv_cache={"type": "fp8"}),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.conftest import make_tiny_llama

    path = tmp_path_factory.mktemp("tiny128")
    make_tiny_llama(path, hidden=128, inter=256)
    return path


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(3))


def _run(model_dir, ids, out, cfg, k):
    shards = shard_calibration(ids.shape[0], k, cfg.micro_batch)
    workers = [LayerWorker(str(model_dir), ids[s.rows], micro_batch=cfg.micro_batch, hessian_dtype=torch.float64,
                           rank=r) for r, s in enumerate(shards)]
    return compress_layers(LocalBackend(workers), OffloadedModel(model_dir), cfg, out, "fp")


def _shards(folder):
    return {p.name: load_file(p) for p in sorted((folder / "model").glob("*.safetensors"))}


@pytest.mark.parametrize("name", sorted(CASES))
def test_scheme_identical_across_workers_and_loads(name, model_dir, calib, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = CompressConfig(micro_batch=2, hessian_dtype="float64", **CASES[name])
    rec1 = _run(model_dir, calib, tmp_path / "k1", cfg, 1)
    rec3 = _run(model_dir, calib, tmp_path / "k3", cfg, 3)
    one, three = _shards(tmp_path / "k1"), _shards(tmp_path / "k3")
    assert one.keys() == three.keys()
    for shard, tensors in one.items():
        assert tensors.keys() == three[shard].keys(), shard
        for key, t in tensors.items():
            assert torch.equal(t, three[shard][key]), f"{shard}:{key}"
    assert [r["module"] for r in rec1] == [r["module"] for r in rec3]
    qc = json.loads((tmp_path / "k1" / "model" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    assert bool(qc.get("kv_cache_scheme")) == (name == "FP8-KV")
    kwargs = {}
    if name.startswith("W4A16_ASYM"):
        # transformers 5.25 + compressed-tensors 0.20 cannot load any asymmetric checkpoint on the
        # default (packed) path: it allocates the zero point unpacked (d_out, n_groups) and then
        # decompresses it as packed. The dequantizing path loads the packed int32 zero point that
        # the library, llm-compressor and vLLM write.
        from transformers import CompressedTensorsConfig

        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "k1" / "model", output_loading_info=True,
                                                       trust_remote_code=False, **kwargs)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    # stock transformers 5 + compressed-tensors 0.20 attach no KV cache (the library looks for a
    # `past_key_values` argument that transformers 5 renamed `cache`), so it does not expect the
    # attention modules' k_scale / v_scale; models.load attaches them (tests/models/test_load.py)
    kv_names = {k for k in info["unexpected_keys"] if k.endswith((".k_scale", ".v_scale"))}
    assert info["unexpected_keys"] == (kv_names if name == "FP8-KV" else set()), info
    keys = {k for t in one.values() for k in t}
    if name == "FP8-KV":
        assert "model.layers.0.self_attn.k_scale" in keys and "model.layers.1.self_attn.v_scale" in keys
    if name in ("FP8", "NVFP4"):  # calibrated static input scales
        assert any(k.endswith("input_scale") or k.endswith("input_global_scale") for k in keys)
    if name == "W4A16-AWQ":  # the grid search never does worse than plain round to nearest
        smoothed = [r for r in rec1 if "awq_ratio" in r]
        assert len(smoothed) == 2 * 5  # q, k, v, gate, up of 2 layers
        assert all(r["awq_loss"] <= r["awq_loss_unscaled"] for r in smoothed)
    if name == "W8A8-INT8-SQ":  # the smoothed norms travel with the layer
        dense = {k: v for p in model_dir.glob("*.safetensors") for k, v in load_file(p).items()}
        norm = "model.layers.0.input_layernorm.weight"
        assert not torch.equal(dense[norm], next(t[norm] for t in one.values() if norm in t))
