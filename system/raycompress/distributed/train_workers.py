"""The Ray Train shell of the train stage: a `TorchTrainer` whose per-worker function feeds
`training.session` (strategy, loop, checkpoints: no Ray there) with this worker's Ray Data shard,
device and rank, the checkpoint to resume, and `ray.train.report` for its checkpoints.

Resuming from a checkpoint at step k reproduces an uninterrupted run when the data order is
deterministic (`make_trainer` sets `preserve_order`, which makes Ray Data's streaming split assign
rows to ranks the same way each run) and each worker uses a fixed number of torch threads
(`train.torch_threads`): bit for bit with DDP on gloo.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from raycompress.config import TrainConfig
from raycompress.models.fetch import ModelRef

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainRun:
    """What one Ray Train run is given: the job's `train` section (the only train schema) and this
    run's locations: the start model (a local folder, or a `ModelRef` each worker resolves to its
    node's folder), where rank 0 publishes the trained model (path or URI; None: not
    published), and a checkpoint folder of an earlier run to resume from (None: start fresh)."""

    train: TrainConfig
    model_dir: str | ModelRef
    output_dir: str | None = None
    resume_from: str | None = None


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
            raise ValueError(f"this worker's data shard has fewer than train.batch_size={batch_size} rows")


def _report(metrics: dict, folder: Path | None) -> None:
    import ray.train

    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)) if folder else None)


def _checkpoint(resume_from: str | None):
    """This run's latest reported checkpoint (a restarted worker group), else the folder
    `resume_from` (another run's; Ray Train v2 drops `resume_from_checkpoint`), else None."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None and resume_from:
        ckpt = ray.train.Checkpoint(resume_from)
    return ckpt


def train_func(config: dict) -> None:
    """Ray Train per-worker function; `config` = {"run": TrainRun}. Needs a dataset named "train"
    with an "input_ids" column of (seq_len,) int64 rows.

    Raises:
        ValueError: a quantized checkpoint, or a shard smaller than one batch.
    """
    import ray.train
    import ray.train.torch

    from raycompress.training.session import run_session, start_session

    run: TrainRun = config["run"]
    model_dir = run.model_dir if isinstance(run.model_dir, str) else str(run.model_dir.local())
    rank = ray.train.get_context().get_world_rank()
    ckpt = _checkpoint(run.resume_from)
    with (ckpt.as_directory() if ckpt else nullcontext(None)) as d:
        session = start_session(run.train, model_dir, Path(d) if d else None, ray.train.torch.get_device(), rank)
    shard = ray.train.get_dataset_shard("train")
    run_session(session, lambda skip: _batches(shard, run.train.batch_size, skip), _report, model_dir,
                run.output_dir)


def make_trainer(run: TrainRun, dataset, storage_path: str, name: str, timeout_s: float = 1800):
    """A `TorchTrainer` running `train_func` over `dataset` with `run.train`'s workers, every
    reported checkpoint kept: gloo on CPU workers (`gpus_per_worker` 0), nccl with GPUs otherwise.

    Args:
        run: the train section and this run's locations.
        dataset: Ray Data dataset with an "input_ids" column; split across workers in a fixed order.
        storage_path: where Ray Train keeps the run's checkpoints (path or URI); name: the run's folder.
        timeout_s: torch.distributed's collective timeout (seconds): a rank left waiting in a
            collective fails the run after this long instead of hanging.
    """
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t = run.train
    gpu = t.gpus_per_worker > 0
    return TorchTrainer(
        train_func, train_loop_config={"run": run},
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo", timeout_s=int(timeout_s)),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=gpu, resources_per_worker={
            "CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if gpu else {})}),
        run_config=RunConfig(name=name, storage_path=storage_path, checkpoint_config=CheckpointConfig()),
        datasets={"train": dataset},
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
    )
