"""Tiny random mixture-of-experts checkpoints built from config (no download): one per MoE row of
`models.arch.ARCHITECTURES`, saved with transformers' own `save_pretrained`."""
from __future__ import annotations

import torch

MOE_ARCHS = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")


def moe_config(arch: str, layers: int = 2, hidden: int = 32, experts: int = 8, top_k: int = 2, vocab: int = 128,
               **extra):
    """A tiny config for `arch`: `experts` routed experts of intermediate size 32, `top_k` per token;
    `extra` config fields (e.g. Qwen-MoE's mlp_only_layers=[1] for a dense-MLP layer)."""
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=top_k)
    if arch == "MixtralForCausalLM":
        cfg = tf.MixtralConfig(intermediate_size=32, num_local_experts=experts, **common, **extra)
    elif arch == "Qwen2MoeForCausalLM":
        cfg = tf.Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=32, shared_expert_intermediate_size=40,
                                num_experts=experts, **common, **extra)
    else:
        cfg = tf.Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=32, num_experts=experts, head_dim=8,
                                **common, **extra)
    cfg.architectures = [arch]
    return cfg


def make_tiny_moe(path, arch: str, seed: int = 0, **kw):
    """Save a random `arch` model (tiny config, `moe_config(**kw)`) at `path`; returns the model (eval, fp32)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(moe_config(arch, **kw)).eval()
    model.save_pretrained(path)
    return model
