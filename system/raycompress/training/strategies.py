"""The train strategies behind one interface (`Strategy`), registered by `train.strategy`: DDP
(torch DistributedDataParallel) and DeepSpeed ZeRO-2/3 (`deepspeed_engine`). A strategy owns the
wrapped model and its optimizer: one masked optimizer step, its optimizer state in a checkpoint
folder, and the full state dict. Everything else (data, GMP, metrics, the checkpoint's common
files, the final model) is the same code for both (`training.session`, `training.checkpoint`).
No Ray here: the caller sets up torch.distributed (Ray Train does) and names this rank's device.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import torch

from raycompress.config import TrainConfig
from raycompress.training.loop import train_step
from raycompress.training.masks import WeightMask

log = logging.getLogger(__name__)

DS_TAG = "ds"  # DeepSpeed's checkpoint folder inside a checkpoint, and its tag


class Strategy(Protocol):
    """What the train session needs from a strategy; built as
    `STRATEGIES[name](model, mask, cfg, ckpt_dir, device, rank)` on every rank, where `mask` was
    built on `model` before wrapping and `ckpt_dir` (or None) is the checkpoint being resumed."""

    model: torch.nn.Module  # the unwrapped *ForCausalLM (its config and save_pretrained)

    def step(self, batch: torch.Tensor) -> float:
        """One optimizer step on (batch, seq_len) int64 token ids; masked weights exactly 0 after it.
        Returns this rank's loss (nats/token)."""

    def save(self, folder: Path) -> None:
        """Every rank: this strategy's optimizer state into the checkpoint `folder`."""

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """Every rank (a collective at ZeRO-3): the full state dict in the checkpoint's dtype on
        rank 0, None on the others."""


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class DDPStrategy:
    """train.strategy: ddp. The model on `device`, wrapped in DistributedDataParallel when the
    process group has more than one rank (gradients all-reduced over gloo or nccl); torch AdamW;
    the mask's gradient hooks attached. Checkpoint part: `optimizer.pt` (rank 0; every rank holds
    the same state)."""

    def __init__(self, model: torch.nn.Module, mask: WeightMask, cfg: TrainConfig, ckpt_dir: Path | None,
                 device: torch.device, rank: int) -> None:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.model, self.mask, self.device, self.rank = model.to(device), mask, device, rank
        mask.update(dict(mask.masks))  # the masks onto the weights' device
        mask.attach()
        self.wrapped = self.model
        if _world_size() > 1:
            ids = [device] if device.type == "cuda" else None
            self.wrapped = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        if ckpt_dir is not None:
            self.optimizer.load_state_dict(torch.load(ckpt_dir / "optimizer.pt", weights_only=True))

    def step(self, batch: torch.Tensor) -> float:
        return train_step(self.wrapped, batch.to(self.device), self.optimizer, self.mask)

    def save(self, folder: Path) -> None:
        if self.rank == 0:
            torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        return self.model.state_dict() if self.rank == 0 else None


class DeepSpeedStrategy:
    """train.strategy: deepspeed. A ZeRO `cfg.zero_stage` engine (`deepspeed_engine.make_engine`;
    bf16 when the checkpoint is bfloat16) on the accelerator DeepSpeed picks; the mask re-applied
    to the weights and their fp32 master copies after each step (`deepspeed_step`). Checkpoint
    part: `ds/` (DeepSpeed's checkpoint, every rank its optimizer partition)."""

    def __init__(self, model: torch.nn.Module, mask: WeightMask, cfg: TrainConfig, ckpt_dir: Path | None,
                 device: torch.device, rank: int) -> None:
        from raycompress.training.deepspeed_engine import ds_config, make_engine

        self.model, self.mask = model, mask
        self.dtype = next(model.parameters()).dtype
        config = ds_config(cfg.zero_stage, cfg.offload, cfg.batch_size, cfg.lr, cfg.weight_decay,
                           bf16=self.dtype == torch.bfloat16)
        self.engine, _ = make_engine(model, config)
        if ckpt_dir is not None:
            self.engine.load_checkpoint(str(ckpt_dir / DS_TAG), tag=DS_TAG)

    def step(self, batch: torch.Tensor) -> float:
        from raycompress.training.deepspeed_engine import deepspeed_step

        return deepspeed_step(self.engine, batch, self.mask)

    def save(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder / DS_TAG), tag=DS_TAG)

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        from raycompress.training.deepspeed_engine import full_state_dict

        return full_state_dict(self.engine, dtype=self.dtype)


STRATEGIES: dict[str, type] = {"ddp": DDPStrategy, "deepspeed": DeepSpeedStrategy}
