"""A pure-PyTorch sparse train loop: causal-LM steps over packed fixed-length token sequences with
the weight mask held, and gradual magnitude pruning (GMP) applied every dt steps. No Ray here.

GMP: Zhu & Gupta 2017, "To prune, or not to prune", eq. 1 (`algorithms.gmp`); at each pruning step
the masks are recomputed from the live weights at the scheduled sparsity, before that step's
forward pass, with already-pruned entries kept pruned.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

import torch

from raycompress.algorithms.gmp import gmp_sparsity, is_pruning_step, magnitude_masks
from raycompress.config import GMPScheduleConfig
from raycompress.training.masks import WeightMask

log = logging.getLogger(__name__)


def pack_tokens(docs: Iterable[list[int]], seq_len: int, eos_id: int | None = None) -> torch.Tensor:
    """Concatenate token lists (each followed by `eos_id` when given) and cut fixed-length rows.

    Args:
        docs: token id lists, one per document.
        seq_len: tokens per row (>= 2: a causal-LM loss needs a next token).
    Returns:
        (n_rows, seq_len) int64; the tail shorter than seq_len is dropped.
    Raises:
        ValueError: seq_len < 2.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 tokens, got {seq_len}")
    flat: list[int] = []
    for ids in docs:
        flat.extend(ids)
        if eos_id is not None:
            flat.append(eos_id)
    n = len(flat) // seq_len
    return torch.tensor(flat[: n * seq_len], dtype=torch.int64).reshape(n, seq_len)


def gmp_update(mask: WeightMask, step: int, gmp: GMPScheduleConfig) -> float | None:
    """At a pruning step of `gmp` (its `initial_sparsity` resolved, not None), recompute the masks
    at the scheduled sparsity and zero the newly pruned weights; returns that sparsity, or None off
    the pruning steps.

    Raises:
        ValueError: `gmp.initial_sparsity` is None (resolve it with `resolve_gmp` first).
    """
    if gmp.initial_sparsity is None:
        raise ValueError("gmp_update needs a resolved schedule: initial_sparsity is None (use resolve_gmp)")
    sched = (gmp.initial_sparsity, gmp.final_sparsity, gmp.start_step, gmp.n_prunes, gmp.interval)
    if not is_pruning_step(step, *sched[2:]):
        return None
    s = gmp_sparsity(step, *sched)
    mask.update(magnitude_masks(mask.weights(), s, gmp.scope, prev=mask.masks))
    log.info("GMP step %d: sparsity %.4f (%d of %d masked)", step, s, *mask.counts())
    return s


def resolve_gmp(gmp: GMPScheduleConfig | None, sparsity_start: float) -> GMPScheduleConfig | None:
    """`gmp` with `initial_sparsity` None replaced by the run's starting sparsity (a fraction)."""
    if gmp is None or gmp.initial_sparsity is not None:
        return gmp
    return gmp.model_copy(update={"initial_sparsity": sparsity_start})


def train_step(model: torch.nn.Module, input_ids: torch.Tensor, optimizer: torch.optim.Optimizer,
               mask: WeightMask) -> float:
    """One causal-LM step: loss = model(input_ids, labels=input_ids).loss (transformers shifts the
    labels), backward (the mask's hooks zero masked gradients), step, zero_grad, re-apply the mask.

    Args:
        model: a transformers *ForCausalLM, possibly wrapped in DDP.
        input_ids: (batch, seq_len) int64.
    Returns:
        the loss (mean token cross-entropy, nats).
    """
    model.train()
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    mask.apply()
    return float(loss.detach())


def train_loop(step_fn: Callable[[torch.Tensor], float], batches: Iterator[torch.Tensor], mask: WeightMask,
               steps: int, start_step: int = 0, gmp: GMPScheduleConfig | None = None,
               on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Run steps start_step .. steps-1, one batch (batch, seq_len) int64 from `batches` each.

    `step_fn(batch) -> loss` is one optimizer step that leaves masked weights at 0 (`train_step`
    bound to a model and optimizer, or a `training.strategies` strategy's `step`). GMP, when given
    (resolved: `resolve_gmp`), prunes before the forward pass of each of its pruning steps.
    `on_step(step, loss)` runs after each step (reporting, checkpointing). Resuming: pass the step
    to resume at and an iterator already past the consumed batches.

    Returns:
        the losses of the steps run.
    Raises:
        ValueError: the GMP schedule ends outside the budget (`GMPScheduleConfig.check_within`),
            or `batches` ran out.
    """
    if gmp is not None:
        gmp.check_within(steps)
    losses = []
    for step in range(start_step, steps):
        if gmp is not None:
            gmp_update(mask, step, gmp)
        batch = next(batches, None)
        if batch is None:
            raise ValueError(f"the batch iterator ran out at step {step} of {steps}")
        losses.append(step_fn(batch))
        if on_step is not None:
            on_step(step, losses[-1])
    return losses
