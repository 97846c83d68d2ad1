"""Fixtures shared by the training tests (imported by name: a second conftest.py would shadow the root one for `from conftest import`)."""
import pytest
import torch

from raycompress.training.masks import target_linears


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory, tiny_llama_dir):
    """The 2-layer hidden-64 tiny Llama, its target linears magnitude-pruned to 50% (exact zeros)."""
    from transformers import AutoModelForCausalLM

    from raycompress.algorithms.gmp import magnitude_masks

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    lins = target_linears(model)
    masks = magnitude_masks({n: lin.weight for n, lin in lins.items()}, 0.5, "layer")
    with torch.no_grad():
        for n, lin in lins.items():
            lin.weight.masked_fill_(masks[n], 0)
    out = tmp_path_factory.mktemp("pruned")
    model.save_pretrained(out)
    return out, {n: m.clone() for n, m in masks.items()}
