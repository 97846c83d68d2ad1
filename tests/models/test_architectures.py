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


@pytest.mark.parametrize("arch", sorted(a for a, s in ARCHITECTURES.items() if s.moe is None))
def test_worker_matches_model_and_checkpoint_reloads(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(arch)).eval()
    model.save_pretrained(tmp_path / "src")
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    worker = LayerWorker(str(tmp_path / "src"), ids, micro_batch=2)
    worker.begin_layer(0)
    targets = list(worker.model.spec.linears)
    worker.apply({t: {"weight": worker.layer.get_submodule(t).weight.data} for t in targets})
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(worker.hidden, ref, atol=1e-5, rtol=0)

    w = LayerWorker(str(tmp_path / "src"), ids)
    compress_layers(LocalBackend([w]), OffloadedModel(tmp_path / "src"), CompressConfig(algorithm="sparsegpt"), tmp_path / "out", "fp")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    down = reloaded.get_submodule(f"{ARCHITECTURES[arch].layers}.1.{ARCHITECTURES[arch].mlp_down}").weight
    assert float((down == 0).float().mean()) == 0.5


@pytest.mark.parametrize("arch", sorted(a for a, s in ARCHITECTURES.items() if s.moe is None))
def test_cus_prun_shrinks_the_ffn_of_every_architecture(arch, tmp_path):
    """Cus-Prun writes a smaller dense checkpoint (OPT: fc1 rows and bias, fc2 columns, ffn_dim)
    that transformers reloads, and whose outputs equal the pruned layers the workers ran."""
    import json

    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_config(arch)).save_pretrained(tmp_path / "src")
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    cfg = CompressConfig(algorithm="cus_prun", sparsity=0.5, cus_prun={"dimensions": {"domain": ["x"]}})
    w = LayerWorker(str(tmp_path / "src"), ids, subsets={"domain": torch.ones(4, dtype=torch.bool)})
    compress_layers(LocalBackend([w]), OffloadedModel(tmp_path / "src"), cfg, tmp_path / "out", "fp")
    spec = ARCHITECTURES[arch]
    assert json.loads((tmp_path / "out" / "model" / "config.json").read_text())[spec.intermediate_key] == 64
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model").eval()
    for name in spec.mlp_up:
        up = reloaded.get_submodule(f"{spec.layers}.1.{name}")
        assert up.weight.shape == (64, 64) and (up.bias is None or up.bias.shape == (64,))
    assert reloaded.get_submodule(f"{spec.layers}.1.{spec.mlp_down}").weight.shape == (64, 64)
    with torch.no_grad():
        hidden = reloaded(ids, output_hidden_states=True).hidden_states
    # the last entry of hidden_states is after the final norm; compare the layer-0 output instead
    w0 = LayerWorker(str(tmp_path / "out" / "model"), ids)
    w0.begin_layer(0)
    w0.propagate_dense()
    torch.testing.assert_close(w0.hidden, hidden[1], atol=1e-5, rtol=0)
