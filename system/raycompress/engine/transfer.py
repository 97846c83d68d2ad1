"""What crosses between workers: tensors leave a worker on the CPU (the object store's side) and
land on the receiver's device; sizes are counted where they are received."""
from __future__ import annotations

import torch


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def cpu_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors on the CPU (no copy for CPU tensors)."""
    return {k: v.to("cpu") for k, v in tensors.items()}


def to_device(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in tensors.items()}


def shard_rows(n: int, k: int, unit: int) -> list[slice]:
    """k contiguous row ranges of n calibration rows, each starting at a multiple of `unit` (the
    micro-batch), as even as whole units allow: every worker then runs the same micro-batches
    whatever k is, so statistics do not depend on the number of workers. Trailing ranges may be
    empty when there are fewer units than workers."""
    units = -(-n // unit) if n else 0
    per = [units // k + (1 if j < units % k else 0) for j in range(k)]
    out, start = [], 0
    for p in per:
        end = min(n, start + p * unit)
        out.append(slice(start, end))
        start = end
    return out
