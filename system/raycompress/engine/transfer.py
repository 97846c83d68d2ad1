"""What crosses between workers: the calibration shard each compression worker gets
(`shard_calibration`), and tensors, which leave a worker on the CPU (the object store's side) and
land on the receiver's device; sizes are counted where they are received."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch


class Shipped:
    """A CPU tensor that crosses Ray's object store without copies: pickled as a NumPy array
    (bf16/f16 as int16 bits, the 8-bit floats of FP8 / NVFP4 scales as uint8 bits, which NumPy
    has no dtype for), which Ray stores out of band and a receiver maps zero-copy; it unpickles
    to a plain (read-only) torch.Tensor. In-process (no pickling) `unship` unwraps it."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t

    def __reduce__(self):
        t = self.t.detach().contiguous()
        if t.dtype in (torch.bfloat16, torch.float16):
            return _rebuild, (t.view(torch.int16).numpy(), str(t.dtype).removeprefix("torch."))
        if t.is_floating_point() and t.element_size() == 1:
            return _rebuild, (t.view(torch.uint8).numpy(), str(t.dtype).removeprefix("torch."))
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
    empty when there are fewer units than workers (`shard_calibration` never asks for those)."""
    units = -(-n // unit) if n else 0
    per = [units // k + (1 if j < units % k else 0) for j in range(k)]
    out, start = [], 0
    for p in per:
        end = min(n, start + p * unit)
        out.append(slice(start, end))
        start = end
    return out


@dataclass(frozen=True)
class Shard:
    """One compression worker's part of the calibration set: its rows and, per named subset
    (`engine.subsets.row_subsets`), the (rows.stop - rows.start,) bool mask of those rows."""

    rows: slice
    subsets: dict[str, torch.Tensor]

    @property
    def n(self) -> int:
        return self.rows.stop - self.rows.start


def shard_calibration(n_rows: int, actors: int, micro_batch: int,
                      subsets: dict[str, torch.Tensor] | None = None) -> list[Shard]:
    """How the compress stage splits its calibration set, the one rule the stage, the dry-run plan
    and the tests use: min(`actors`, whole micro-batches) workers (never an idle one), each a
    contiguous range of whole micro-batches (`shard_rows`), each subset mask (n_rows,) cut the same
    way. The number of workers is `len(result)`; their row counts `[s.n for s in result]`.

    Raises:
        ValueError: `actors` or `micro_batch` below 1, or a mask whose length is not `n_rows`.
    """
    if actors < 1 or micro_batch < 1:
        raise ValueError(f"shard_calibration: actors ({actors}) and micro_batch ({micro_batch}) must be >= 1")
    subsets = subsets or {}
    bad = {name: len(m) for name, m in subsets.items() if len(m) != n_rows}
    if bad:
        raise ValueError(f"shard_calibration: subset masks of lengths {bad} over {n_rows} calibration rows")
    k = max(1, min(actors, -(-n_rows // micro_batch)))
    return [Shard(s, {name: m[s] for name, m in subsets.items()}) for s in shard_rows(n_rows, k, micro_batch)]
