"""The train stage's checkpoint folder and final model: what a checkpoint holds, how a run starts
from one, the metrics reported with it, and the published model. I/O only; no Ray here.

A checkpoint folder holds, whatever the strategy (`training.strategies`):
- `model/` (rank 0): `save_pretrained` of the full state dict (config + safetensors, the
  checkpoint's dtype);
- `masks.safetensors` (rank 0): uint8 masks, exact even where a kept weight is 0;
- `state.json` (rank 0): {"step": optimizer steps done, "sparsity_start": the run's starting sparsity};
- the strategy's optimizer state: `optimizer.pt` (DDP, rank 0) or `ds/` (DeepSpeed, every rank
  its partition).
A driver that gathers the folders every rank wrote (Ray Train does) has one checkpoint.
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import torch

from raycompress.training.masks import WeightMask, refuse_quantized

log = logging.getLogger(__name__)


def sparsity(mask: WeightMask) -> float:
    """The `sparsity` every strategy reports: the fraction of the target linears' weights the mask
    holds at exactly 0 (mask bits / weights). It equals the fraction of exact zeros in those weights
    (the mask is taken from the checkpoint's zeros and re-applied after every step), and, unlike a
    count of live zeros, it is known on every rank under ZeRO-3, where the weights are partitioned."""
    masked, total = mask.counts()
    return masked / total


def step_metrics(step: int, loss: float, mask: WeightMask, sparsity_start: float) -> dict:
    """The metrics reported at a checkpoint step: step (optimizer steps done), loss (nats/token,
    this rank's batch), sparsity and sparsity_start (fractions, `sparsity`), masked and
    target_weights (counts)."""
    masked, total = mask.counts()
    return {"step": step, "loss": loss, "sparsity": sparsity(mask), "masked": masked, "target_weights": total,
            "sparsity_start": sparsity_start}


def load_start(model_dir: str, ckpt_dir: Path | None):
    """The model training starts from: `ckpt_dir/model` when resuming, else `model_dir`.

    Returns:
        (model in its checkpoint dtype, mask, start step, the run's starting sparsity): the mask
        from the checkpoint's `masks.safetensors` when resuming, else from the model's exact zeros.
    Raises:
        ValueError: the checkpoint is quantized (`masks.refuse_quantized`).
    """
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    source = ckpt_dir / "model" if ckpt_dir else Path(model_dir)
    refuse_quantized(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto", trust_remote_code=False)
    mask = WeightMask.from_zeros(model)
    if ckpt_dir is None:
        return model, mask, 0, sparsity(mask)
    mask.load_state_dict(load_file(str(ckpt_dir / "masks.safetensors")))
    state = json.loads((ckpt_dir / "state.json").read_text())
    log.info("resuming at step %d from %s", state["step"], ckpt_dir)
    return model, mask, state["step"], state.get("sparsity_start", sparsity(mask))


def save_common(folder: Path, model: torch.nn.Module, state_dict: dict, mask: WeightMask, step: int,
                sparsity_start: float) -> None:
    """Rank 0's part of a checkpoint (module docstring): model/, masks.safetensors, state.json."""
    from safetensors.torch import save_file

    model.save_pretrained(folder / "model", state_dict=state_dict)  # transformers >= 5: safetensors only
    save_file(mask.state_dict(), str(folder / "masks.safetensors"))
    (folder / "state.json").write_text(json.dumps({"step": step, "sparsity_start": sparsity_start}))


def save_final(model: torch.nn.Module, model_dir: str, output_dir: str, state_dict: dict | None = None) -> dict:
    """Publish the trained model at `output_dir` (local path or URI) in the compress stage's format:
    safetensors shards in the model's own dtype, the index, config and tokenizer files of
    `model_dir`, and last `manifest.sha256.json` (`models.checkpoint.finalize_checkpoint`).
    `state_dict`: the weights to write instead of the model's own (the strategy's gathered ones).
    Returns the manifest (I/O only)."""
    from raycompress.models.checkpoint import finalize_checkpoint
    from raycompress.storage import uri

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        shards = sorted(p.name for p in Path(tmp).glob("*.safetensors"))
        for name in shards:
            uri.copy(str(Path(tmp) / name), uri.join(output_dir, name))
    manifest = finalize_checkpoint(output_dir, model_dir, shards)
    log.info("saved the trained model to %s", uri.display(output_dir))
    return manifest
