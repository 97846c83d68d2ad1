"""The DeepSpeed side of the `train` stage (train.strategy: deepspeed): a ZeRO-2/3 config, the engine,
one causal-LM step that keeps pruned weights at exactly 0, and a full state dict for the final save.

ZeRO: Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models" (SC20): stage 2 partitions optimizer state and gradients across data-parallel ranks,
stage 3 the parameters as well. Config keys: https://www.deepspeed.ai/docs/config-json/
(zero_optimization, offload_optimizer, offload_param, bf16, optimizer).

Where the pruned weights live under ZeRO (read from deepspeed 0.19.8, checked by the tests):
- ZeRO keeps an fp32 master copy of every weight in the optimizer, partitioned across ranks, and
  copies it back into the model's (bf16 or fp32) parameters after each step. Zeroing only the model
  parameters (`WeightMask.apply`) is therefore not enough: the master copy keeps the old value and
  the next step writes it back. `apply_mask` zeroes both, each rank only its own partition, with no
  communication:
  - stage 2: the model parameter is whole on every rank (masked whole); its master fragment is
    `param._hp_mapping.get_hp_fragment()`, the slice `lp_fragment_address` (start, numel) of the
    flattened weight.
  - stage 3: the parameter's data is empty outside forward/backward; this rank's slice is
    `param.ds_tensor` (flat, `partition_numel()` long, elements rank*n .. rank*n+n-1 of the
    flattened weight, zero-padded on the last rank); the master slice is read and written with
    `deepspeed.utils.safe_get/set_local_fp32_param`. Parameters under
    `stage3_param_persistence_threshold` (default 1e5 elements; `ds_persist`) are all-gathered at
    the end of every step and the next forward uses that full copy without re-gathering, so their
    full data is masked too (masking only `ds_tensor` leaves the forward the old values).
  The stage-3 alternative, `deepspeed.zero.GatheredParameters(params, modifier_rank=0)`, gathers
  every masked weight on every rank each step and re-partitions it; it is also unnecessary.
- `WeightMask.attach()` hooks are tensor hooks on the leaf parameter: they run before ZeRO's
  gradient-accumulation hooks flatten and reduce the gradient, so they do fire under stage 2 and 3
  (the gradient is whole there) and keep masked gradients, hence AdamW moments, at 0. Re-zeroing the
  weights after each step is the guarantee either way (e.g. after GMP grows a mask, the moments of
  newly masked entries are not 0; a decoupled weight decay keeps 0 at 0).
- Under stage 3 `WeightMask.from_zeros`, `update`, `apply`, `zeros` and `weights` see empty
  parameters: build the mask before `make_engine`; GMP mask growth under stage 3 is not supported.
"""
from __future__ import annotations

import logging

import torch

from raycompress.training.masks import WeightMask

log = logging.getLogger(__name__)

INSTALL_HINT = ("train.strategy: deepspeed needs the [train] extra: pip install '.[train]' (with the torch "
                "pin: -c infra/constraints.txt), or set train.strategy: ddp")


def ds_config(zero_stage: int, offload: bool, batch_size: int, lr: float, weight_decay: float, bf16: bool,
              grad_accum: int = 1) -> dict:
    """A DeepSpeed config dict for ZeRO `zero_stage` with DeepSpeed's AdamW (decoupled weight decay).

    Args:
        zero_stage: 2 (optimizer state + gradients partitioned) or 3 (+ parameters).
        offload: optimizer state (and, at stage 3, parameters) in CPU memory
            (`offload_optimizer` / `offload_param` with device "cpu"; DeepSpeedCPUAdam runs the step).
        batch_size: sequences per rank per micro step (`train_micro_batch_size_per_gpu`).
        lr, weight_decay: AdamW's.
        bf16: `bf16.enabled` (the engine casts the model to bfloat16; the master weights stay fp32).
        grad_accum: micro steps per optimizer step (`gradient_accumulation_steps`).
    Returns:
        a plain dict for `make_engine`; fp16 is always off. Stage 3 also sets
        `stage3_gather_16bit_weights_on_model_save` (so `engine.save_16bit_model` works too).
    Raises:
        ValueError: zero_stage not 2 or 3, batch_size or grad_accum < 1.
    """
    if zero_stage not in (2, 3):
        raise ValueError(f"zero_stage must be 2 or 3, got {zero_stage!r}")
    if batch_size < 1 or grad_accum < 1:
        raise ValueError(f"batch_size and grad_accum must be >= 1, got {batch_size}, {grad_accum}")
    zero: dict = {"stage": zero_stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    if zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": grad_accum,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": weight_decay}},
        "zero_optimization": zero,
        "bf16": {"enabled": bool(bf16)},
        "fp16": {"enabled": False},
    }


def _deepspeed():
    try:
        import deepspeed
    except ImportError as e:
        raise RuntimeError(f"{INSTALL_HINT} ({e})") from e
    return deepspeed


def make_engine(model: torch.nn.Module, config: dict):
    """`deepspeed.initialize` over all trainable parameters of `model` with `config` (`ds_config`).

    Needs torch.distributed set up or settable: under Ray Train's TorchTrainer it is (DeepSpeed
    reuses the process group); elsewhere RANK, LOCAL_RANK, WORLD_SIZE (and MASTER_ADDR/PORT) must be
    set. The engine moves the model to the accelerator (DS_ACCELERATOR, else CUDA if present,
    else CPU) and at stage 3 partitions its parameters in place. Do not wrap the model in DDP
    (`ray.train.torch.prepare_model`) first.

    Returns:
        (engine, optimizer): the DeepSpeedEngine (call it like the model) and its ZeRO optimizer.
    Raises:
        RuntimeError: deepspeed is not installed (the message says how to install it).
    """
    deepspeed = _deepspeed()
    params = [p for p in model.parameters() if p.requires_grad]
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=config)
    return engine, optimizer


def _flat_slice(m: torch.Tensor, start: int, numel: int) -> torch.Tensor:
    """Elements start .. start+numel-1 of the flattened bool mask, padded with False past its end."""
    flat = m.reshape(-1)
    out = torch.zeros(numel, dtype=torch.bool, device=m.device)
    n = max(0, min(numel, flat.numel() - start))
    if n:
        out[:n] = flat[start:start + n]
    return out


@torch.no_grad()
def apply_mask(engine, mask: WeightMask) -> None:
    """Set the masked entries of every target weight to exactly 0 on this rank: the model parameter
    (stage 2: whole; stage 3: this rank's partition, and the full data if gathered) and its fp32
    master copy in the ZeRO optimizer (this rank's fragment). No communication; every rank calls it.

    Args:
        engine: from `make_engine`, wrapping the model `mask` was built on (before `make_engine`).
        mask: bool masks (d_out, d_in), True = pruned.
    """
    from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

    for name, lin in mask.linears.items():
        p, m = lin.weight, mask.masks[name]
        if hasattr(p, "ds_id"):  # ZeRO-3 partitioned parameter
            n = p.ds_tensor.numel()
            rank = torch.distributed.get_rank(group=getattr(p, "ds_process_group", None))
            local = _flat_slice(m, rank * n, n)
            p.ds_tensor.masked_fill_(local.to(p.ds_tensor.device).view_as(p.ds_tensor), 0)
            if p.data.numel() == p.ds_numel:  # gathered (persistent small parameter)
                p.data.masked_fill_(m.to(p.device).view_as(p.data), 0)
            hp = safe_get_local_fp32_param(p)
            if hp is not None:
                safe_set_local_fp32_param(p, hp.masked_fill(local.to(hp.device).view_as(hp), 0))
            continue
        p.data.masked_fill_(m.to(p.device), 0)
        frag = getattr(p, "_hp_mapping", None)
        if frag is not None:  # this rank's slice of the fp32 master
            a = frag.lp_fragment_address
            hp = frag.get_hp_fragment()
            hp.masked_fill_(m.reshape(-1).narrow(0, a.start, a.numel).to(hp.device).view_as(hp), 0)


def deepspeed_step(engine, input_ids: torch.Tensor, mask: WeightMask) -> float:
    """One causal-LM micro step: loss = engine(input_ids, labels=input_ids).loss (transformers shifts
    the labels), engine.backward, engine.step (an optimizer step at each gradient-accumulation
    boundary), then `apply_mask` so masked weights and their master copies are exactly 0.

    Args:
        engine: from `make_engine`.
        input_ids: (batch, seq_len) int64; moved to the engine's device.
        mask: the model's WeightMask (built before `make_engine`).
    Returns:
        the loss (mean token cross-entropy, nats) of this rank's batch.
    """
    engine.train()
    input_ids = input_ids.to(engine.device)
    loss = engine(input_ids=input_ids, labels=input_ids).loss
    engine.backward(loss)
    engine.step()
    apply_mask(engine, mask)
    return float(loss.detach())


def full_state_dict(engine, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict on CPU, for `model.save_pretrained(out, state_dict=...)` on rank 0.

    Stage 3 gathers one module's parameters at a time onto rank 0
    (`engine._zero3_consolidated_16bit_state_dict`, a collective: EVERY rank must call this);
    stage 2 parameters are whole on each rank already. Values are the model parameters (the
    engine's dtype: bfloat16 when bf16 was enabled), masked entries exactly 0 after `apply_mask`.

    Args:
        dtype: cast floating tensors to this (e.g. the checkpoint's dtype); None keeps the engine's.
    Returns:
        name -> tensor on rank 0 (tied weights share one tensor), None on the other ranks.
    """
    if engine.zero_optimization_partition_weights():
        state = engine._zero3_consolidated_16bit_state_dict()
    elif torch.distributed.get_rank() == 0:
        state = {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}
    else:
        state = None
    if state is None:
        return None
    cast: dict[int, torch.Tensor] = {}  # keeps tied tensors tied
    return {k: cast.setdefault(id(v), v.to(dtype) if dtype is not None and v.is_floating_point() else v)
            for k, v in state.items()}
