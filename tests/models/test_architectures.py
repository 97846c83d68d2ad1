"""Every architecture in the table: the offloaded worker reproduces the model's layer-0 output,
and a SparseGPT run writes a checkpoint that transformers reloads."""
import pytest
import torch

from raycompress.config import CompressConfig
from raycompress.engine.pipeline import LocalBackend, compress_layers
from raycompress.engine.worker import LayerWorker
from raycompress.models.arch import ARCHITECTURES
from raycompress.models.weights import OffloadedModel


def _config(arch):
    import transformers as tf

    common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
    if arch == "OPTForCausalLM":
        cfg = tf.OPTConfig(ffn_dim=128, word_embed_proj_dim=64, **common)
    else:
        cls = {"LlamaForCausalLM": tf.LlamaConfig, "MistralForCausalLM": tf.MistralConfig,
               "Qwen2ForCausalLM": tf.Qwen2Config, "Qwen3ForCausalLM": tf.Qwen3Config}[arch]
        cfg = cls(intermediate_size=128, num_key_value_heads=2, **common)
    cfg.architectures = [arch]
    return cfg


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_worker_matches_model_and_checkpoint_reloads(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(arch)).eval()
    model.save_pretrained(tmp_path / "src")
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    worker = LayerWorker(str(tmp_path / "src"), ids, micro_batch=2)
    worker.begin_layer(0)
    targets = list(worker.model.spec.linears)
    worker.apply(targets, *[{"weight": worker.layer.get_submodule(t).weight.data} for t in targets])
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(worker.hidden, ref, atol=1e-5, rtol=0)

    w = LayerWorker(str(tmp_path / "src"), ids)
    compress_layers(LocalBackend([w]), OffloadedModel(tmp_path / "src"), CompressConfig(algorithm="sparsegpt"), tmp_path / "out", "fp")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    down = reloaded.get_submodule(f"{ARCHITECTURES[arch].layers}.1.{ARCHITECTURES[arch].mlp_down}").weight
    assert float((down == 0).float().mean()) == 0.5
