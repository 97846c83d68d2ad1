"""models.quantized + engine: GPTQ checkpoints in pack-quantized format reload in transformers
with outputs identical to the in-memory compressed layers, and unpack back exactly."""
import json

import pytest
import torch

from raycompress.config import CompressConfig, ConfigError
from raycompress.engine.pipeline import LocalBackend, compress_layers
from raycompress.engine.worker import LayerWorker
from raycompress.models.weights import OffloadedModel
from raycompress.models.quantized import resolve


@pytest.mark.parametrize("quant,algo", [({"bits": 4, "group_size": 32}, "gptq"), ({"bits": 8, "group_size": None}, "gptq"),
                                        ({"bits": 4, "group_size": 32, "act_order": True}, "gptq"),
                                        ({"bits": 4, "group_size": 32}, "sparsegpt")])
def test_quantized_checkpoint_reloads(tiny_llama_dir, tmp_path, quant, algo):
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    worker = LayerWorker(str(tiny_llama_dir), ids)
    cfg = CompressConfig(algorithm=algo, quant=quant)
    compress_layers(LocalBackend([worker]), OffloadedModel(tiny_llama_dir), cfg, tmp_path, "fp")
    conf = json.loads((tmp_path / "model" / "config.json").read_text())["quantization_config"]
    assert conf["format"] == "pack-quantized" and conf["quant_method"] == "compressed-tensors"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        last = model(ids, output_hidden_states=True).hidden_states[-1]
        assert torch.allclose(last, model.model.norm(worker.hidden), atol=1e-5)
    # replay path: a written quantized layer unpacks to the same dequantized weights
    om = OffloadedModel(tiny_llama_dir)
    layer = om.load_layer_from_shard(1, tmp_path / "model" / "model-00002-of-00003.safetensors", resolve(cfg))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(layer.mlp(x), model.model.layers[1].mlp(x), atol=1e-5)


def test_asymmetric_quant_config_resolves_to_a_zero_point_scheme():
    """Asymmetric integer quantization is no longer refused: it writes pack-quantized weights with
    packed zero points (see tests/models/test_quantized_formats.py for how they reload)."""

    scheme = resolve(CompressConfig(algorithm="gptq", quant={"bits": 4, "symmetric": False}))
    assert not scheme.weight_spec.symmetric and not scheme.ct.weights.symmetric and scheme.format == "pack-quantized"
    with pytest.raises(ValueError, match="needs a 'scheme'"):
        CompressConfig(algorithm="gptq")
    assert ConfigError  # the loader wraps these ValueErrors with file and field
