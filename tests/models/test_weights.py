"""models.weights.OffloadedModel: meta skeleton, per-module loading from safetensors."""
import json

import pytest
import torch

from raycompress.models.weights import OffloadedModel


@pytest.fixture(scope="module")
def full_model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def test_no_config_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        OffloadedModel(tmp_path)


def test_no_weights_raises(tmp_path, tiny_llama_dir):
    (tmp_path / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="safetensors"):
        OffloadedModel(tmp_path)


def test_skeleton_is_meta_and_layers_counted(tiny_llama_dir):
    m = OffloadedModel(tiny_llama_dir)
    assert m.num_layers == 2
    assert next(m.skeleton.parameters()).device.type == "meta"
    assert (tiny_llama_dir / "model.safetensors.index.json").is_file()  # sharded checkpoint
    assert len(set(m.weight_map.values())) > 1


def test_load_layer_matches_full_model(tiny_llama_dir, full_model):
    m = OffloadedModel(tiny_llama_dir)
    layer = m.load_layer(1)
    ref = full_model.model.layers[1].state_dict()
    got = layer.state_dict()
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    assert not layer.training


def test_tied_lm_head_and_outside_layers(tiny_llama_dir, full_model):
    m = OffloadedModel(tiny_llama_dir)
    head = m.load_module("lm_head")
    assert torch.equal(head.weight, full_model.lm_head.weight)
    outside = m.read_outside_layers()
    assert "model.embed_tokens.weight" in outside and "model.norm.weight" in outside
    assert not any(k.startswith("model.layers.") for k in outside)
    with pytest.raises(KeyError, match="no weights"):
        m.read_tensors("model.nothing")


@pytest.mark.parametrize("shard", ["../../outside.safetensors", "/etc/passwd", "pytorch_model.bin"])
def test_index_naming_files_outside_the_folder_or_pickles_is_refused(tmp_path, tiny_llama_dir, shard):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, model)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="outside the model folder or not .safetensors"):
        OffloadedModel(model)
