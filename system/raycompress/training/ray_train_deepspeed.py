"""The DeepSpeed branch of `ray_train.train_func` (train.strategy: deepspeed): the same data,
schedule, metrics and output as the DDP branch, with the model wrapped by a ZeRO-2/3 engine
(`deepspeed_engine`) instead of DDP.

A reported checkpoint folder holds what the DDP branch writes (`model/` from the gathered full
state dict, `masks.safetensors`, `state.json`; rank 0) plus `ds/` (DeepSpeed's own checkpoint:
every rank writes its optimizer partition, tag "ds"), so a restarted worker group resumes the
optimizer state exactly. Ray Train merges the folders every rank reports into one checkpoint.
"""
from __future__ import annotations

import logging
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch

from raycompress.training.loop import check_budget, gmp_update
from raycompress.training.masks import WeightMask

log = logging.getLogger(__name__)
TAG = "ds"


def _save(folder: Path, engine, model, mask: WeightMask, step: int, s0: float, dtype, rank: int):
    """Every rank: DeepSpeed's checkpoint into folder/ds; the gathered state dict (a collective at
    stage 3) saved by rank 0 with the masks and the step. Returns the state dict (rank 0) or None."""
    from safetensors.torch import save_file

    from raycompress.training.deepspeed_engine import full_state_dict

    engine.save_checkpoint(str(folder / TAG), tag=TAG)
    sd = full_state_dict(engine, dtype=dtype)
    if rank == 0:
        import json

        model.save_pretrained(folder / "model", state_dict=sd)
        save_file(mask.state_dict(), str(folder / "masks.safetensors"))
        (folder / "state.json").write_text(json.dumps({"step": step, "sparsity_start": s0}))
    return sd


def train_deepspeed(cfg: dict, model_dir: str, batches, load) -> None:
    """Run `cfg["steps"]` steps with DeepSpeed ZeRO `cfg["zero_stage"]` on this worker.

    Args:
        cfg: `ray_train` train_loop_config (with strategy / zero_stage / offload).
        model_dir: the start checkpoint's local folder.
        batches: fn(skip) -> iterator of (batch, seq_len) int64 batches from this worker's shard.
        load: `ray_train._load` (model, mask, optimizer state, step, starting sparsity).
    Raises:
        ValueError: GMP with ZeRO-3 (masks cannot be recomputed from partitioned weights).
    """
    import ray.train

    from raycompress.training.deepspeed_engine import deepspeed_step, ds_config, make_engine
    from raycompress.training.ray_train import _schedule

    if cfg["gmp"] and cfg["zero_stage"] == 3:
        raise ValueError("train.gmp with train.zero_stage: 3 is not supported (masks cannot be recomputed from "
                         "partitioned weights); use zero_stage: 2 or a fixed mask")
    rank = ray.train.get_context().get_world_rank()
    ckpt = ray.train.get_checkpoint() or (ray.train.Checkpoint(cfg["resume_from"]) if cfg["resume_from"] else None)
    with (ckpt.as_directory() if ckpt else nullcontext(None)) as d:
        model, mask, _, start, s0 = load(model_dir, Path(d) if d else None)
        dtype = next(model.parameters()).dtype
        if s0 is None:
            s0 = mask.zeros()[0] / mask.zeros()[1]
        gmp = _schedule(cfg["gmp"], mask)
        check_budget(gmp, cfg["steps"])
        config = ds_config(cfg["zero_stage"], cfg["offload"], cfg["batch_size"], cfg["lr"], cfg["weight_decay"],
                           bf16=dtype == torch.bfloat16)
        engine, _ = make_engine(model, config)
        if d:
            engine.load_checkpoint(str(Path(d) / TAG), tag=TAG)
    it, sd = batches(start), None
    for step in range(start, cfg["steps"]):
        if gmp is not None:
            gmp_update(mask, step, gmp)
        loss = deepspeed_step(engine, next(it), mask)
        done = step + 1
        if done == cfg["steps"] or (cfg["checkpoint_every"] and done % cfg["checkpoint_every"] == 0):
            masked, total = mask.counts()
            metrics = {"step": done, "loss": loss, "sparsity": masked / total, "masked": masked,
                       "target_weights": total, "sparsity_start": s0}
            with tempfile.TemporaryDirectory() as tmp:
                sd = _save(Path(tmp), engine, model, mask, done, s0, dtype, rank)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    if sd is None and start < cfg["steps"] or start == cfg["steps"]:  # nothing reported in this run
        from raycompress.training.deepspeed_engine import full_state_dict

        sd = full_state_dict(engine, dtype=dtype)
    if rank == 0 and cfg["output_dir"]:
        from raycompress.training.ray_train import save_final

        save_final(model, model_dir, cfg["output_dir"], state_dict=sd)
