"""One train run on one rank, whatever the strategy: load the start (a model folder or a checkpoint
being resumed), build the strategy (`training.strategies`), run the loop with GMP, save and report
checkpoints at the same steps with the same metrics, and publish the final model from rank 0.
No Ray here: the caller passes this rank's batches, its device and rank, and a `report` function
(the Ray Train shell: `distributed.train_workers`).
"""
from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from raycompress.config import GMPScheduleConfig, TrainConfig
from raycompress.training.checkpoint import load_start, save_common, save_final, step_metrics
from raycompress.training.loop import resolve_gmp, train_loop
from raycompress.training.masks import WeightMask
from raycompress.training.strategies import STRATEGIES, Strategy

log = logging.getLogger(__name__)

# report(metrics, folder): every rank at every checkpoint step; folder is what this rank wrote
# into the checkpoint (None when it wrote nothing), valid only during the call
Report = Callable[[dict, Path | None], None]


@dataclass
class Session:
    """A rank's run: the strategy, the mask, the step it starts at, the run's starting sparsity
    (a fraction, `checkpoint.sparsity`) and the resolved GMP schedule (None: the mask is fixed)."""

    cfg: TrainConfig
    strategy: Strategy
    mask: WeightMask
    start: int
    sparsity_start: float
    gmp: GMPScheduleConfig | None
    rank: int


def start_session(cfg: TrainConfig, model_dir: str, ckpt_dir: Path | None, device: torch.device,
                  rank: int) -> Session:
    """Every rank: seed and threads from `cfg`, the model from `ckpt_dir` (resume) or `model_dir`,
    the strategy built (at ZeRO-3 this partitions the model). `ckpt_dir` must exist until this
    returns (the strategy reads its optimizer state from it).

    Raises:
        ValueError: a quantized start checkpoint (`masks.refuse_quantized`).
    """
    torch.set_num_threads(cfg.torch_threads)
    torch.manual_seed(cfg.seed)
    model, mask, start, s0 = load_start(model_dir, ckpt_dir)
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable()
    strategy = STRATEGIES[cfg.strategy](model, mask, cfg, ckpt_dir, device, rank)
    return Session(cfg, strategy, mask, start, s0, resolve_gmp(cfg.gmp, s0), rank)


def save_checkpoint(folder: Path, s: Session, step: int) -> dict | None:
    """Every rank together: the strategy's part, then the full state dict gathered (a collective
    at ZeRO-3) and, on rank 0, the common files (`training.checkpoint`). Returns the full state
    dict on rank 0, None on the others."""
    s.strategy.save(folder)
    state = s.strategy.state_dict()
    if s.rank == 0:
        save_common(folder, s.strategy.model, state, s.mask, step, s.sparsity_start)
    return state


def run_session(s: Session, batches: Callable[[int], Iterator[torch.Tensor]], report: Report, model_dir: str,
                output_dir: str | None) -> None:
    """Every rank: steps s.start .. cfg.steps-1 on `batches(skip)` (this rank's (batch, seq_len)
    int64 batches, the first `skip` dropped), a checkpoint reported every `cfg.checkpoint_every`
    steps and at the last step; then rank 0 publishes the final model at `output_dir`
    (`checkpoint.save_final`; None: not published).

    Raises:
        ValueError: the batches ran out, or a GMP schedule outside the budget.
    """
    cfg, final = s.cfg, None

    def on_step(step: int, loss: float) -> None:
        nonlocal final
        done = step + 1
        if done != cfg.steps and not (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
            return
        with tempfile.TemporaryDirectory() as tmp:
            final = save_checkpoint(Path(tmp), s, done)
            report(step_metrics(done, loss, s.mask, s.sparsity_start), Path(tmp) if any(Path(tmp).iterdir()) else None)

    train_loop(s.strategy.step, batches(s.start), s.mask, cfg.steps, start_step=s.start, gmp=s.gmp, on_step=on_step)
    # The last step always saves a checkpoint, which gathered the final weights with every rank
    # taking part; gather again only when no step ran (resumed at the end). The decision reads
    # only s.start and cfg.steps, the same on every rank: at ZeRO-3 the gather is a collective
    # every rank must enter, though rank 0 alone gets the result (`final` is None elsewhere).
    if s.start >= cfg.steps:
        final = s.strategy.state_dict()
    if s.rank == 0 and output_dir:
        save_final(s.strategy.model, model_dir, output_dir, state_dict=final)
