"""What crosses between workers: tensors leave a worker on the CPU (the object store's side) and
land on the receiver's device; sizes are counted where they are received."""
from __future__ import annotations

import warnings

import torch


class Shipped:
    """A CPU tensor that crosses Ray's object store without copies: pickled as a NumPy array
    (bf16/f16 as int16 bits), which Ray stores out of band and a receiver maps zero-copy; it
    unpickles to a plain (read-only) torch.Tensor. In-process (no pickling) `unship` unwraps it."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t

    def __reduce__(self):
        t = self.t.detach().contiguous()
        if t.dtype in (torch.bfloat16, torch.float16):
            return _rebuild, (t.view(torch.int16).numpy(), str(t.dtype).removeprefix("torch."))
        return _rebuild, (t.numpy(), "")


def _rebuild(arr, dtype: str) -> torch.Tensor:
    with warnings.catch_warnings():  # arrays from the object store are read-only; we only read them
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(arr)
    return t.view(getattr(torch, dtype)) if dtype else t


def unship(x):
    return x.t if isinstance(x, Shipped) else x


def nbytes(t) -> int:
    t = unship(t)
    return t.numel() * t.element_size()


def cpu_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, Shipped]:
    """The same tensors on the CPU (no copy for CPU tensors), wrapped for a zero-copy trip."""
    return {k: Shipped(v.to("cpu")) for k, v in tensors.items()}


def to_device(tensors: dict, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: unship(v).to(device) for k, v in tensors.items()}


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
