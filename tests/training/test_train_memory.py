"""training.memory: known-answer bytes per worker for DDP / ZeRO-2 / ZeRO-3 / offload on a tiny
config counted by hand, the Llama-3-70B sizing (parameters, what fits an 80 GB GPU at 64 workers),
and check_train_fits naming the cheapest strategy that fits."""
from __future__ import annotations

import pytest

from raycompress.config import TrainConfig
from raycompress.training.memory import COMPONENTS, GIB, check_train_fits, count_parameters, model_shape, train_memory

# hidden 8, 2 heads of 4, 1 KV head, FFN 16, 2 layers, vocab 32, untied, bf16
TINY = {"architectures": ["LlamaForCausalLM"], "hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1,
        "intermediate_size": 16, "num_hidden_layers": 2, "vocab_size": 32, "tie_word_embeddings": False,
        "dtype": "bfloat16"}
# embeddings 2·32·8 = 512; per layer q 64 + k 32 + v 32 + o 64 + gate/up/down 3·128 = 576 linear
# weights + 2 norms of 8 = 592; final norm 8: 512 + 2·592 + 8 = 1704, target linears 2·576 = 1152
N, TARGETS = 1704, 1152
# s=4, b=2, h=8, a=2: one layer sbh·34 + 5·a·s²·b = 2176 + 320 = 2496; logits s·b·V·4 = 1024
LAYER_ACT, LOGITS = 2496, 1024
LLAMA70B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 8192, "intermediate_size": 28672,
            "num_attention_heads": 64, "num_key_value_heads": 8, "num_hidden_layers": 80, "vocab_size": 128256,
            "tie_word_embeddings": False, "dtype": "bfloat16"}


def _train(**kw) -> TrainConfig:
    return TrainConfig(**{"steps": 10, "seq_len": 4, "batch_size": 2, "gpus_per_worker": 1.0, **kw})


def _big(**kw) -> TrainConfig:
    return TrainConfig(**{"steps": 10, "seq_len": 4096, "batch_size": 1, "num_workers": 64, "gpus_per_worker": 1.0,
                          "activation_checkpointing": True, **kw})


def test_tiny_parameter_count_matches_the_model_transformers_builds():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    counts = count_parameters(model_shape(TINY))
    assert counts == {"total": N, "target_linears": TARGETS, "largest_matrix": 32 * 8}
    cfg = LlamaConfig(**{k: v for k, v in TINY.items() if k not in ("architectures", "dtype")})
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == N
    assert count_parameters(model_shape(cfg))["total"] == N  # a config object as well as its dict
    assert count_parameters(model_shape({**TINY, "tie_word_embeddings": True}))["total"] == N - 32 * 8


def test_tiny_ddp_bytes():
    e = train_memory(TINY, _train(), world_size=4)
    assert (e["parameters"], e["gradients"], e["optimizer"], e["mask"]) == (2 * N, 2 * N, 12 * N, TARGETS)
    assert e["zero3_buffers"] == 0 and e["logits"] == LOGITS
    assert e["activations"] == 2 * LAYER_ACT  # no recompute: every layer's activations
    assert e["total"] == e["device_total"] == 16 * N + TARGETS + 2 * LAYER_ACT + LOGITS and e["host_total"] == 0
    assert e["label"] == "ddp" and e["n_params"] == N and e["device"] == "gpu"
    ckpt = train_memory(TINY, _train(activation_checkpointing=True), world_size=4)
    assert ckpt["activations"] == 2 * (2 * 4 * 2 * 8) + LAYER_ACT  # L·2sbh inputs + one layer recomputed


def test_tiny_zero2_zero3_and_offload_bytes():
    z2 = train_memory(TINY, _train(strategy="deepspeed", zero_stage=2), world_size=4)
    assert (z2["parameters"], z2["gradients"], z2["optimizer"], z2["mask"]) == (2 * N, 2 * N // 4, 12 * N // 4, TARGETS)
    z3 = train_memory(TINY, _train(strategy="deepspeed", zero_stage=3), world_size=4)
    assert (z3["parameters"], z3["gradients"], z3["optimizer"], z3["mask"]) == (852, 852, 5112, 288)
    assert z3["zero3_buffers"] == 2 * 2 * 32 * 8  # params + grads of the largest matrix (the embedding)
    off = train_memory(TINY, _train(strategy="deepspeed", zero_stage=3, offload=True), world_size=4)
    assert off["host_total"] == 5112 + 852 + 288 and off["device_total"] == z3["device_total"] - off["host_total"]
    assert off["total"] == z3["total"] and off["label"] == "zero3+offload"
    off2 = train_memory(TINY, _train(strategy="deepspeed", zero_stage=2, offload=True), world_size=4)
    assert off2["host_total"] == 12 * N // 4  # ZeRO-2 offload moves the optimizer state only


def test_fp32_model_keeps_8_bytes_of_adam_state_and_cpu_workers_hold_all_in_ram():
    e = train_memory({**TINY, "dtype": "float32"}, _train(), world_size=1)
    assert (e["parameters"], e["gradients"], e["optimizer"]) == (4 * N, 4 * N, 8 * N)
    assert e["activations"] == 2 * 2 * LAYER_ACT
    cpu = train_memory(TINY, _train(strategy="deepspeed", zero_stage=3, offload=True, gpus_per_worker=0.0), 4)
    assert cpu["device"] == "cpu" and cpu["host_total"] == 0 and cpu["device_total"] == cpu["total"]


@pytest.mark.parametrize("missing", ["hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
                                     "intermediate_size"])
def test_a_missing_field_is_named(missing):
    with pytest.raises(ValueError, match=f"'{missing}'"):
        train_memory({k: v for k, v in TINY.items() if k != missing}, _train(), 1)


def test_bad_dtype_architecture_world_size():
    with pytest.raises(ValueError, match="int8"):
        train_memory({**TINY, "dtype": "int8"}, _train(), 1)
    with pytest.raises(ValueError, match="unsupported architecture"):
        train_memory({**TINY, "architectures": ["GPT2LMHeadModel"]}, _train(), 1)
    with pytest.raises(ValueError, match="world_size"):
        train_memory(TINY, _train(), 0)


def test_llama70b_parameters_and_ddp_is_refused():
    e = train_memory(LLAMA70B, _big(), world_size=64)
    assert abs(e["n_params"] - 70_553_706_496) / 70_553_706_496 < 0.01
    assert e["n_params"] == 70_553_706_496  # the layout counts Llama-3-70B exactly
    assert e["parameters"] + e["gradients"] + e["optimizer"] == 16 * e["n_params"]  # 2Ψ + 2Ψ + 12Ψ
    assert e["device_total"] > 1e12
    problems = check_train_fits(e, 80e9, None)
    assert len(problems) == 1 and "GiB per GPU needed with ddp" in problems[0]
    assert "train.strategy: deepspeed, train.zero_stage: 3" in problems[0], problems


def test_llama70b_zero3_over_64_gpus_fits_80gb_with_activation_checkpointing():
    z3 = train_memory(LLAMA70B, _big(strategy="deepspeed", zero_stage=3), world_size=64)
    assert z3["device_total"] < 80e9 and check_train_fits(z3, 80e9, 250e9) == []
    no_ckpt = train_memory(LLAMA70B, _big(strategy="deepspeed", zero_stage=3, activation_checkpointing=False), 64)
    assert no_ckpt["activations"] > 80e9  # Korthikanti eq. 1 at s = 4096: ~6 GiB per layer, 80 layers
    (msg,) = check_train_fits(no_ckpt, 80e9, None)
    assert msg.endswith(f"use train.activation_checkpointing: true (est. {z3['device_total'] / GIB:.1f} GiB per GPU, "
                        "0.0 GiB host)"), msg
    z2 = train_memory(LLAMA70B, _big(strategy="deepspeed", zero_stage=2), world_size=64)
    assert z2["device_total"] > 80e9 and "use train.zero_stage: 3" in check_train_fits(z2, 80e9, None)[0]


def test_llama70b_zero3_offload_moves_optimizer_and_params_to_host():
    z3 = train_memory(LLAMA70B, _big(strategy="deepspeed", zero_stage=3), world_size=64)
    off = train_memory(LLAMA70B, _big(strategy="deepspeed", zero_stage=3, offload=True), world_size=64)
    assert off["host_total"] == off["optimizer"] + off["parameters"] + off["mask"]
    assert off["optimizer"] == 12 * off["n_params"] // 64
    assert off["device_total"] == z3["device_total"] - off["host_total"] < 25 * GIB
    problems = check_train_fits(off, 80e9, 1 * GIB)  # the node's RAM cannot hold the offloaded state
    assert len(problems) == 1 and "of host memory per worker" in problems[0]
    assert "use train.offload: false" in problems[0], problems


def test_nothing_fits_says_what_to_lower():
    e = train_memory(LLAMA70B, _big(strategy="deepspeed", zero_stage=3, offload=True), world_size=64)
    (msg,) = check_train_fits(e, 4 * GIB, None)
    assert "no strategy fits 64 workers at batch_size 1, seq_len 4096" in msg
    cpu = train_memory(TINY, _train(gpus_per_worker=0.0), world_size=2)
    (msg,) = check_train_fits(cpu, cpu["total"] - 1, None)
    assert "per CPU worker needed with ddp" in msg and "use train.activation_checkpointing: true" in msg
    assert all(cpu[c] >= 0 for c in COMPONENTS)


def test_advice_never_names_a_strategy_the_schema_refuses():
    gmp = {"final_sparsity": 0.5, "n_prunes": 2, "interval": 2}
    z2 = train_memory(LLAMA70B, _big(strategy="deepspeed", zero_stage=2, gmp=gmp), world_size=64)
    (msg,) = check_train_fits(z2, 80e9, None)  # ZeRO-3 would fit, but refuses GMP (TrainConfig)
    assert "zero_stage: 3" not in msg and "no strategy fits" in msg, msg
