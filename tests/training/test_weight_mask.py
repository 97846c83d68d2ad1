"""training.masks: pruned weights stay exactly zero through AdamW steps; quantized checkpoints refused."""
import json

import pytest
import torch

from raycompress.algorithms.gmp import magnitude_masks
from raycompress.training.loop import pack_tokens, train_step
from raycompress.training.masks import WeightMask, refuse_quantized, target_linears


def pruned_llama(folder, sparsity=0.5):
    """The tiny Llama from `folder`, every target linear magnitude-pruned per layer (exact zeros)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    lins = target_linears(model)
    masks = magnitude_masks({n: l.weight for n, l in lins.items()}, sparsity, "layer")
    with torch.no_grad():
        for n, lin in lins.items():
            lin.weight.masked_fill_(masks[n], 0)
    return model, masks


def test_targets_are_the_decoder_linears(tiny_llama_dir):
    model, _ = pruned_llama(tiny_llama_dir)
    names = list(target_linears(model))
    assert len(names) == 2 * 7 and names[0] == "model.layers.0.self_attn.q_proj"
    assert not any("embed" in n or "lm_head" in n for n in names)


def test_mask_held_through_adamw_steps(tiny_llama_dir):
    torch.manual_seed(0)
    model, masks = pruned_llama(tiny_llama_dir)
    mask = WeightMask.from_zeros(model)
    assert all(torch.equal(mask.masks[n], masks[n]) for n in masks)
    before = mask.zeros()
    mask.attach()
    snapshot = {n: w.detach().clone() for n, w in mask.weights().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    data = torch.randint(0, 256, (5, 4, 16))  # 5 steps of (batch 4, seq 16)
    losses = [train_step(model, batch, opt, mask) for batch in data]
    assert all(torch.isfinite(torch.tensor(losses)))
    for n, w in mask.weights().items():
        assert (w[mask.masks[n]] == 0).all(), n
        assert not torch.equal(w, snapshot[n]), f"{n} did not train"
    assert mask.zeros() == before == mask.counts()  # sparsity exactly equal before / after
    assert before[0] == before[1] // 2


def test_gradients_of_masked_entries_are_zero(tiny_llama_dir):
    model, _ = pruned_llama(tiny_llama_dir)
    mask = WeightMask.from_zeros(model)
    mask.attach()
    ids = torch.randint(0, 256, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    for n, w in mask.weights().items():
        assert (w.grad[mask.masks[n]] == 0).all() and (w.grad[~mask.masks[n]] != 0).any(), n
    mask.detach()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    assert any((w.grad[mask.masks[n]] != 0).any() for n, w in mask.weights().items())


def test_mask_state_round_trip_and_shape_errors(tiny_llama_dir):
    model, masks = pruned_llama(tiny_llama_dir)
    mask = WeightMask.from_zeros(model)
    state = mask.state_dict()
    assert all(t.dtype == torch.uint8 for t in state.values())
    fresh, _ = pruned_llama(tiny_llama_dir, sparsity=0.0)
    other = WeightMask.from_zeros(fresh)
    other.load_state_dict(state)
    assert other.zeros() == mask.zeros()
    name = next(iter(masks))
    with pytest.raises(ValueError, match="shape"):
        other.update({name: torch.zeros(3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="unknown linear"):
        other.update({"nope": torch.zeros(3, 3, dtype=torch.bool)})


def test_refuses_quantized_checkpoints(tmp_path, tiny_llama_dir):
    from safetensors.torch import save_file

    refuse_quantized(tiny_llama_dir)  # a float checkpoint passes
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "config.json").write_text(json.dumps({"quantization_config": {"format": "pack-quantized"}}))
    with pytest.raises(ValueError, match=rf"{cfg}.*quantization_config"):
        refuse_quantized(cfg)
    packed = tmp_path / "packed"
    packed.mkdir()
    (packed / "config.json").write_text("{}")
    save_file({"model.layers.0.mlp.up_proj.weight_packed": torch.zeros(2, 2, dtype=torch.int32)},
              str(packed / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"{packed}.*weight_packed"):
        refuse_quantized(packed)


def test_pack_tokens():
    rows = pack_tokens([[1, 2, 3], [4, 5]], seq_len=3, eos_id=0)  # 1 2 3 0 4 5 0 -> 2 rows, tail dropped
    assert rows.tolist() == [[1, 2, 3], [0, 4, 5]] and rows.dtype == torch.int64
    with pytest.raises(ValueError):
        pack_tokens([[1]], seq_len=1)
