"""The Ray Train shell around `training.loop`: a `TorchTrainer` train function (DDP; gloo on CPU)
over a Ray Data dataset of packed sequences, checkpoints through `ray.train.report`, resume from
`ray.train.get_checkpoint()`, and the final model written as safetensors in the checkpoint's dtype.

A reported checkpoint folder holds `model/` (save_pretrained: config + safetensors), `optimizer.pt`
(AdamW state), `masks.safetensors` (uint8 masks, exact even where a kept weight is 0) and
`state.json` ({"step": optimizer steps done}). Resuming from it at step k reproduces an
uninterrupted run bit for bit when the data order is deterministic (`make_trainer` sets
`preserve_order`, which makes Ray Data's streaming split assign rows to ranks the same way each
run) and each worker uses a fixed number of torch threads.
"""
from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from raycompress.training.loop import GMPSchedule, check_budget, train_loop
from raycompress.training.masks import WeightMask, refuse_quantized

log = logging.getLogger(__name__)

# train_loop_config keys read by `train_func`: the required ones, and the rest with defaults
REQUIRED = ("model_dir", "steps")
DEFAULTS = {"output_dir": None, "batch_size": 4, "lr": 1e-4, "weight_decay": 0.0, "seed": 0,
            "checkpoint_every": 0, "gmp": None, "torch_threads": 1, "resume_from": None,
            "activation_checkpointing": False, "strategy": "ddp", "zero_stage": 2, "offload": False}


def _config(config: dict) -> dict:
    unknown = set(config) - set(DEFAULTS) - set(REQUIRED)
    missing = [k for k in REQUIRED if config.get(k) is None]
    if unknown or missing:
        raise ValueError(f"train_loop_config: unknown keys {sorted(unknown)}, missing keys {missing}")
    return {**DEFAULTS, **config}


def _batches(shard, batch_size: int, skip: int) -> Iterator[torch.Tensor]:
    """Endless (batch, seq_len) int64 batches from this worker's shard, epoch after epoch, the first
    `skip` dropped (resume). Raises ValueError when an epoch has no full batch."""
    seen = 0
    while True:
        n_epoch = 0
        for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=True, dtypes=torch.int64):
            n_epoch += 1
            seen += 1
            if seen > skip:
                yield batch["input_ids"]
        if n_epoch == 0:
            raise ValueError(f"this worker's data shard has fewer than batch_size={batch_size} rows")


def save_checkpoint(folder: Path, model: torch.nn.Module, optimizer, mask: WeightMask, step: int,
                    sparsity_start: float | None = None) -> None:
    """Write the checkpoint files described in the module docstring into `folder` (I/O only)."""
    from safetensors.torch import save_file

    model.save_pretrained(folder / "model")  # transformers >= 5 writes safetensors only
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    save_file(mask.state_dict(), str(folder / "masks.safetensors"))
    (folder / "state.json").write_text(json.dumps({"step": step, "sparsity_start": sparsity_start}))


def _load(model_dir: str, ckpt_dir: Path | None):
    """(model in its checkpoint dtype, mask, optimizer state or None, start step, the run's starting
    sparsity or None when starting now)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    source = ckpt_dir / "model" if ckpt_dir else Path(model_dir)
    refuse_quantized(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto", trust_remote_code=False)
    mask = WeightMask.from_zeros(model)
    if ckpt_dir is None:
        return model, mask, None, 0, None
    mask.load_state_dict(load_file(str(ckpt_dir / "masks.safetensors")))
    opt = ckpt_dir / "optimizer.pt"  # absent in a DeepSpeed checkpoint (its optimizer state is in ds/)
    opt_state = torch.load(opt, weights_only=True) if opt.is_file() else None
    state = json.loads((ckpt_dir / "state.json").read_text())
    log.info("resuming at step %d from %s", state["step"], ckpt_dir)
    return model, mask, opt_state, state["step"], state.get("sparsity_start")


def _resume_state(model_dir: str, resume_from: str | None):
    """Start from this run's latest reported checkpoint (a restarted worker group), else from the
    checkpoint folder `resume_from` (another run's; Ray Train v2 drops `resume_from_checkpoint`),
    else from the model folder."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None and resume_from:
        ckpt = ray.train.Checkpoint(resume_from)
    if ckpt is None:
        return _load(model_dir, None)
    with ckpt.as_directory() as d:
        return _load(model_dir, Path(d))


def _reporter(model, optimizer, mask: WeightMask, steps: int, every: int, rank: int, sparsity_start: float):
    """on_step callback: at checkpoint steps every rank reports; rank 0 attaches the checkpoint.
    Metrics: step, loss (nats/token), sparsity and sparsity_start (fractions of the target
    linears' weights), masked and target_weights (counts)."""
    import ray.train

    def on_step(step: int, loss: float) -> None:
        done = step + 1
        if done != steps and not (every and done % every == 0):
            return
        zeros, total = mask.zeros()
        metrics = {"step": done, "loss": loss, "sparsity": zeros / total, "masked": mask.counts()[0],
                   "target_weights": total, "sparsity_start": sparsity_start}
        if rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(Path(tmp), model, optimizer, mask, done, sparsity_start)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    return on_step


def train_func(config: dict) -> None:
    """Ray Train per-worker function; `config` is `train_loop_config` (keys: REQUIRED, and DEFAULTS;
    `gmp` a dict of `GMPSchedule` fields or None;
    `resume_from` a checkpoint folder path of an earlier run, or None). Needs a dataset named "train" with an
    "input_ids" column of (seq_len,) int64 rows.

    Raises:
        ValueError: bad config keys, a quantized checkpoint, a GMP schedule past `steps`, or a
            shard smaller than one batch.
    """
    import ray.train
    import ray.train.torch

    cfg = _config(config)
    model_dir = cfg["model_dir"] if isinstance(cfg["model_dir"], str) else str(cfg["model_dir"].local())
    torch.set_num_threads(cfg["torch_threads"])
    torch.manual_seed(cfg["seed"])
    if cfg["strategy"] == "deepspeed":
        from raycompress.training.ray_train_deepspeed import train_deepspeed

        shard = ray.train.get_dataset_shard("train")
        return train_deepspeed(cfg, model_dir, lambda skip: _batches(shard, cfg["batch_size"], skip), _load)
    rank = ray.train.get_context().get_world_rank()
    model, mask, opt_state, start, s0 = _resume_state(model_dir, cfg["resume_from"])
    if s0 is None:
        zeros, total = mask.zeros()
        s0 = zeros / total
    gmp = _schedule(cfg["gmp"], mask)
    check_budget(gmp, cfg["steps"])
    if cfg["activation_checkpointing"]:
        model.gradient_checkpointing_enable()
    mask.attach()
    inner = model
    model = ray.train.torch.prepare_model(model)  # moves to this worker's device; DDP when world size > 1
    optimizer = torch.optim.AdamW(inner.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
    device = ray.train.torch.get_device()
    batches = (b.to(device) for b in _batches(ray.train.get_dataset_shard("train"), cfg["batch_size"], skip=start))
    on_step = _reporter(inner, optimizer, mask, cfg["steps"], cfg["checkpoint_every"], rank, s0)
    train_loop(model, batches, optimizer, mask, cfg["steps"], start_step=start, gmp=gmp, on_step=on_step)
    if rank == 0 and cfg["output_dir"]:
        save_final(inner, model_dir, cfg["output_dir"])


def _schedule(gmp: dict | None, mask: WeightMask) -> GMPSchedule | None:
    """The GMP schedule of `train_loop_config["gmp"]`; s_i None = the loaded checkpoint's measured sparsity."""
    if not gmp:
        return None
    if gmp.get("s_i") is None:
        zeros, total = mask.zeros()
        gmp = {**gmp, "s_i": zeros / total}
    return GMPSchedule(**gmp)


def save_final(model: torch.nn.Module, model_dir: str, output_dir: str, state_dict: dict | None = None) -> dict:
    """Publish the trained model at `output_dir` (local path or URI) in the compress stage's format:
    safetensors shards in the model's own dtype, the index, config and tokenizer files of
    `model_dir`, and last `manifest.sha256.json` (`models.checkpoint.finalize_checkpoint`).
    `state_dict`: the weights to write instead of the model's own (DeepSpeed's gathered ones).
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


def packed_dataset(rows: torch.Tensor):
    """A Ray Data dataset with one "input_ids" row per packed sequence.

    Args:
        rows: (n_rows, seq_len) int64, e.g. from `training.loop.pack_tokens`.
    """
    import ray.data

    return ray.data.from_items([{"input_ids": r} for r in rows.numpy()])


def make_trainer(train_config: dict, dataset, num_workers: int, storage_path: str, name: str,
                 cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0):
    """A `TorchTrainer` running `train_func` over `dataset`, every reported checkpoint kept: DDP over
    gloo on CPU workers (`gpus_per_worker` 0), over nccl with one GPU per worker otherwise.

    Args:
        train_config: `train_func`'s config (REQUIRED and DEFAULTS keys).
        dataset: Ray Data dataset with an "input_ids" column; split across workers in a fixed order.
        Resuming another run: set train_config["resume_from"] to its checkpoint's path.
    """
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    _config(train_config)
    gpu = gpus_per_worker > 0
    return TorchTrainer(
        train_func, train_loop_config=train_config, torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=gpu, resources_per_worker={
            "CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpu else {})}),
        run_config=RunConfig(name=name, storage_path=storage_path, checkpoint_config=CheckpointConfig()),
        datasets={"train": dataset},
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
    )
