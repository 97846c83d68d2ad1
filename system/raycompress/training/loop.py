"""A pure-PyTorch sparse train loop: causal-LM steps over packed fixed-length token sequences with
the weight mask held, and gradual magnitude pruning (GMP) applied every dt steps. No Ray here.

GMP: Zhu & Gupta 2017, "To prune, or not to prune", eq. 1 (`algorithms.gmp`); at each pruning step
the masks are recomputed from the live weights at the scheduled sparsity, before that step's
forward pass, with already-pruned entries kept pruned.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from raycompress.algorithms.gmp import gmp_sparsity, is_pruning_step, magnitude_masks
from raycompress.training.masks import WeightMask

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GMPSchedule:
    """The cubic schedule's fields (steps are optimizer steps; sparsities are fractions)."""

    s_i: float
    s_f: float
    t0: int = 0
    n: int = 1
    dt: int = 1
    scope: str = "global"  # "global": one threshold over all target linears; "layer": per linear

    @property
    def end(self) -> int:
        """The last pruning step, t0 + n*dt."""
        return self.t0 + self.n * self.dt


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


def check_budget(gmp: GMPSchedule | None, steps: int) -> None:
    """Raise ValueError if `steps` < 1 or the GMP schedule's last pruning step is not inside the
    budget (steps 0 .. steps-1), so the final sparsity would never be reached."""
    if steps < 1:
        raise ValueError(f"training needs steps >= 1, got {steps}")
    if gmp is not None:
        gmp_sparsity(0, gmp.s_i, gmp.s_f, gmp.t0, gmp.n, gmp.dt)  # validates the fields
        if gmp.end >= steps:
            raise ValueError(f"GMP schedule ends at step t0 + n*dt = {gmp.end}, outside the training "
                             f"budget of {steps} steps (0..{steps - 1}); lower t0/n/dt or raise steps")


def gmp_update(mask: WeightMask, step: int, gmp: GMPSchedule) -> float | None:
    """At a pruning step, recompute the masks at the scheduled sparsity and zero the newly pruned
    weights; returns that sparsity, or None off the pruning steps."""
    if not is_pruning_step(step, gmp.t0, gmp.n, gmp.dt):
        return None
    s = gmp_sparsity(step, gmp.s_i, gmp.s_f, gmp.t0, gmp.n, gmp.dt)
    mask.update(magnitude_masks(mask.weights(), s, gmp.scope, prev=mask.masks))
    log.info("GMP step %d: sparsity %.4f (%d of %d masked)", step, s, *mask.counts())
    return s


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


def train_loop(model: torch.nn.Module, batches: Iterator[torch.Tensor], optimizer: torch.optim.Optimizer,
               mask: WeightMask, steps: int, start_step: int = 0, gmp: GMPSchedule | None = None,
               on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Run steps start_step .. steps-1, one batch (batch, seq_len) int64 from `batches` each.

    The mask must be attached (`mask.attach()`); GMP, when given, prunes before the forward pass
    of each of its pruning steps. `on_step(step, loss)` runs after each step (reporting,
    checkpointing). Resuming: pass the step to resume at and an iterator already past the
    consumed batches.

    Returns:
        the losses of the steps run.
    Raises:
        ValueError: a bad budget or schedule (`check_budget`), or `batches` ran out.
    """
    check_budget(gmp, steps)
    losses = []
    for step in range(start_step, steps):
        if gmp is not None:
            gmp_update(mask, step, gmp)
        batch = next(batches, None)
        if batch is None:
            raise ValueError(f"the batch iterator ran out at step {step} of {steps}")
        losses.append(train_step(model, batch, optimizer, mask))
        if on_step is not None:
            on_step(step, losses[-1])
    return losses
