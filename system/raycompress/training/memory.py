"""Memory per train worker, by component, from the model's config alone (bytes; arithmetic only).

Ψ = parameters (embeddings vocab·h, twice unless tie_word_embeddings; per decoder layer q/k/v/o with
num_key_value_heads and head_dim = h / heads unless the config sets head_dim, the MLP matrices of
the architecture table (gate/up/down: 3 · h · ffn), two norms of h; the final norm h; biases and
learned positions are not counted, < 1% for models of 1B and more), p = bytes per model element
(bf16/fp16 2, fp32 4), N = world_size, s = seq_len, b = batch_size, a = heads, L = layers, V = vocab.

- parameters p·Ψ, gradients p·Ψ, optimizer state K·Ψ with AdamW K = 12 for a 16-bit model (fp32
  master weights, exp_avg, exp_avg_sq: 4 + 4 + 4) and K = 8 for an fp32 model (the weights are the
  master copy): 2Ψ + 2Ψ + KΨ, ZeRO paper (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations
  Toward Training Trillion Parameter Models", section 3.1 / Table 1 and the section 5 memory model).
  DDP replicates all three; ZeRO-2 divides gradients and optimizer state by N; ZeRO-3 divides
  parameters too; offload keeps optimizer state (ZeRO-3: and parameters) in host memory.
- ZeRO-3 gather buffers: the all-gathered parameters and full gradients of the largest single
  matrix, 2·p·max(V·h, h·ffn, h·a·head_dim) (ZeRO-Infinity, Rajbhandari et al. 2021, section 3,
  "model state working memory").
- mask: 1 byte (bool/uint8) per target-linear weight, partitioned (and offloaded) like the
  parameters it masks.
- activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
  Models", section 4.1, eq. 1, 16-bit, no tensor parallelism): s·b·h·(34 + 5·a·s/h) per layer,
  times L without recomputation; with full activation checkpointing 2·s·b·h per layer (the layer
  inputs) times L plus one layer's full activations during its recompute. Scaled by p/2 for fp32.
  An upper bound when attention never materialises the s×s scores (flash / SDPA kernels).
- logits: s·b·V·4 (fp32 for the cross-entropy loss).

On a CPU worker (gpus_per_worker 0) everything sits in its RAM: device_total = total, host_total = 0.
"""
from __future__ import annotations

import logging

from pydantic import ValidationError

from raycompress.config import TrainConfig

log = logging.getLogger(__name__)

GIB = 2**30
COMPONENTS = ("parameters", "gradients", "optimizer", "zero3_buffers", "mask", "activations", "logits")
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
_MISSING = object()
# strategies in the order of their cost in speed (HF transformers DeepSpeed guide, "How to Choose
# Which ZeRO Stage and Offloads To Use"): DDP > ZeRO-2 > ZeRO-2 + offload > ZeRO-3 > ZeRO-3 + offload
_LADDER = ({"strategy": "ddp", "offload": False}, {"strategy": "deepspeed", "zero_stage": 2, "offload": False},
           {"strategy": "deepspeed", "zero_stage": 2, "offload": True},
           {"strategy": "deepspeed", "zero_stage": 3, "offload": False},
           {"strategy": "deepspeed", "zero_stage": 3, "offload": True})


def _field(config, key: str, default=_MISSING):
    value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
    if value is None:
        if default is _MISSING:
            raise ValueError(f"model config has no '{key}', needed for the train memory estimate")
        return default
    return value


def _spec(archs: list[str]):
    """The architecture table row of `archs`; none given: the Llama layout.

    Raises:
        ValueError: `archs` names no supported architecture.
    """
    from raycompress.models.arch import ARCHITECTURES

    known = [ARCHITECTURES[a] for a in archs if a in ARCHITECTURES]
    if archs and not known:
        raise ValueError(f"unsupported architecture {archs}; supported: {sorted(ARCHITECTURES)}")
    return known[0] if known else ARCHITECTURES["LlamaForCausalLM"]


def model_shape(config, dtype: str | None = None) -> dict:
    """The config fields the estimate uses, as a plain dict that `train_memory` accepts again.
    `config`: a transformers `PretrainedConfig` or its dict; `dtype` overrides the config's.

    Raises:
        ValueError: a needed field (hidden_size, num_hidden_layers, num_attention_heads, vocab_size,
            the intermediate size) is missing, or the architecture / dtype is not supported.
    """
    archs = list(_field(config, "architectures", []))
    spec = _spec(archs)
    h, heads = int(_field(config, "hidden_size")), int(_field(config, "num_attention_heads"))
    dt = dtype or _field(config, "dtype", None) or _field(config, "torch_dtype", "float32")
    dt = str(dt).removeprefix("torch.")
    if dt not in _DTYPE_BYTES:
        raise ValueError(f"model dtype '{dt}' not supported by the train memory estimate; "
                         f"known: {sorted(_DTYPE_BYTES)}")
    return {"architectures": archs, "hidden_size": h, "num_attention_heads": heads,
            "num_key_value_heads": int(_field(config, "num_key_value_heads", heads)),
            "head_dim": int(_field(config, "head_dim", h // heads)),
            spec.intermediate_key: int(_field(config, spec.intermediate_key)),
            "num_hidden_layers": int(_field(config, "num_hidden_layers")),
            "vocab_size": int(_field(config, "vocab_size")),
            "tie_word_embeddings": bool(_field(config, "tie_word_embeddings", False)), "dtype": dt}


def count_parameters(shape: dict) -> dict:
    """{"total", "target_linears" (prunable weights), "largest_matrix"} element counts of `model_shape`'s dict."""
    spec = _spec(shape["architectures"])
    h, hd, ffn = shape["hidden_size"], shape["head_dim"], shape[spec.intermediate_key]
    q, kv = shape["num_attention_heads"] * hd, shape["num_key_value_heads"] * hd
    n_mlp = len(spec.mlp_up) + (1 if spec.mlp_down else 0)
    linears = 2 * h * q + 2 * h * kv + n_mlp * h * ffn
    layers = shape["num_hidden_layers"]
    embed = shape["vocab_size"] * h * (1 if shape["tie_word_embeddings"] else 2)
    return {"total": embed + layers * (linears + 2 * h) + h, "target_linears": layers * linears,
            "largest_matrix": max(shape["vocab_size"] * h, h * ffn, h * q)}


def _activations(shape: dict, train: TrainConfig, p: int) -> int:
    """Korthikanti et al. 2022 eq. 1 per layer; full checkpointing keeps 2sbh per layer plus one layer."""
    s, b, h = train.seq_len, train.batch_size, shape["hidden_size"]
    a, layers = shape["num_attention_heads"], shape["num_hidden_layers"]
    per_layer = s * b * h * 34 + 5 * a * s * s * b  # = sbh(34 + 5as/h), exact in integers
    stored = layers * 2 * s * b * h + per_layer if train.activation_checkpointing else layers * per_layer
    return stored * p // 2


def train_memory(config, train: TrainConfig, world_size: int, dtype: str | None = None) -> dict:
    """Bytes per worker by component (`COMPONENTS`), plus "total", "device_total" (on the GPU, or
    the CPU worker's RAM), "host_total" (offloaded to host RAM), "n_params", "label" (ddp, zero2,
    zero3, "+offload"), "device" ("gpu"/"cpu"), "world_size", and "model" / "train" (the inputs, as
    plain dicts, so `check_train_fits` can re-estimate other strategies). Formulas and sources in
    the module docstring.

    Raises:
        ValueError: the config lacks a needed field (named), or world_size < 1.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    shape = model_shape(config, dtype)
    counts = count_parameters(shape)
    n, p = counts["total"], _DTYPE_BYTES[shape["dtype"]]
    zero = train.zero_stage if train.strategy == "deepspeed" else 0
    shard_params = world_size if zero == 3 else 1
    shard_states = world_size if zero >= 2 else 1
    est = {"parameters": p * n // shard_params, "gradients": p * n // shard_states,
           "optimizer": (12 if p == 2 else 8) * n // shard_states,
           "zero3_buffers": 2 * p * counts["largest_matrix"] if zero == 3 else 0,
           "mask": counts["target_linears"] // shard_params,
           "activations": _activations(shape, train, p),
           "logits": train.seq_len * train.batch_size * shape["vocab_size"] * 4}
    on_host = ({"optimizer"} | ({"parameters", "mask"} if zero == 3 else set())) if train.offload else set()
    gpu = train.gpus_per_worker > 0
    est["total"] = sum(est[c] for c in COMPONENTS)
    est["host_total"] = sum(est[c] for c in on_host) if gpu else 0
    est["device_total"] = est["total"] - est["host_total"]
    label = f"zero{zero}" if zero else "ddp"
    est.update(n_params=n, label=label + ("+offload" if train.offload else ""), device="gpu" if gpu else "cpu",
               world_size=world_size, model=shape, train=train.model_dump(mode="json"))
    log.debug("train memory (%s, %d workers): %.1f GiB per worker", est["label"], world_size, est["total"] / GIB)
    return est


def _advice(change: dict, train: dict) -> str:
    items = [f"train.{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in change.items()
             if train.get(k) != v and not (k == "zero_stage" and change["strategy"] == "ddp")]
    return ", ".join(items)


def _cheapest_fit(estimate: dict, device_bytes: float, host_bytes: float | None) -> tuple[str, dict] | None:
    """The first change along the cost ladder (own checkpointing setting first) that the train schema
    accepts for this job and whose estimate fits."""
    train = estimate["train"]
    flags = [train["activation_checkpointing"]] + ([True] if not train["activation_checkpointing"] else [])
    ladder = _LADDER if estimate["device"] == "gpu" else _LADDER[:1]  # CPU workers: gloo DDP only
    for ac in flags:
        for rung in ladder:
            change = {**rung, "activation_checkpointing": ac}
            try:  # the schema's own rules decide which rungs this job may take (ZeRO-3 refuses GMP)
                alt_train = TrainConfig.model_validate({**train, **change})
            except ValidationError:
                continue
            alt = train_memory(estimate["model"], alt_train, estimate["world_size"])
            if alt["label"] == estimate["label"] and ac == train["activation_checkpointing"]:
                continue  # the plan itself
            if alt["device_total"] <= device_bytes and (host_bytes is None or alt["host_total"] <= host_bytes):
                return _advice(change, train), alt
    return None


def check_train_fits(estimate: dict, device_bytes: float, host_bytes: float | None) -> list[str]:
    """Problems (human-readable, empty when it fits) of a `train_memory` estimate against the memory
    of one worker's device (`device_bytes`: its GPU, or its node's RAM for a CPU worker) and its
    share of host RAM (`host_bytes`, None: unknown, not checked); each names the cheapest strategy
    that would fit, found by re-estimating (bytes in, GiB in the messages)."""
    where = "per GPU" if estimate["device"] == "gpu" else "per CPU worker"
    have = "the GPU has" if estimate["device"] == "gpu" else "the largest node has"
    problems = []
    if estimate["device_total"] > device_bytes:
        problems.append(f"train: {estimate['device_total'] / GIB:.1f} GiB {where} needed with {estimate['label']}, "
                        f"{have} {device_bytes / GIB:.1f} GiB")
    if host_bytes is not None and estimate["host_total"] > host_bytes:
        problems.append(f"train: {estimate['host_total'] / GIB:.1f} GiB of host memory per worker needed with "
                        f"{estimate['label']}, a worker's share of its node is {host_bytes / GIB:.1f} GiB")
    if problems:
        fit = _cheapest_fit(estimate, device_bytes, host_bytes)
        t = estimate["train"]
        problems[-1] += (f"; use {fit[0]} (est. {fit[1]['device_total'] / GIB:.1f} GiB {where}, "
                         f"{fit[1]['host_total'] / GIB:.1f} GiB host)" if fit else
                         f"; no strategy fits {t['num_workers']} workers at batch_size {t['batch_size']}, "
                         f"seq_len {t['seq_len']}: lower them, add workers, or use bigger devices")
    return problems
