"""The two-round selection contract every method implements.

Round 1 (`local`) runs on one shard of candidate windows, in parallel over shards, and keeps at
most k candidates with a score. Round 2 (`merge`) runs once on the union of the shard winners and
keeps k. For score-ranked methods (random keys, zipf, perplexity) the two rounds give exactly the
single-pass result; for ZipCal's greedy coverage they are an approximation whose coverage ratio is
measured by `jobs/benchmarks/selection.py`.

A candidate is a `Window`: a packed sequence of `seq_len` tokens from one source, with a unique
`uid` ("path:shard:index"), its document ids and its set of ZipCal concepts.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass
class Window:
    uid: str
    source: str
    doc_ids: list[str]
    input_ids: np.ndarray  # (seq_len,) int32
    concepts: np.ndarray  # distinct concept ids, int32
    score: float = 0.0
    text: str | None = None  # decoded text, only for methods that need it


@dataclass
class SelectContext:
    """What a method may use besides the windows (all deterministic inputs)."""

    seed: int
    candidate_pool: int = 2000
    word_freq: dict[str, int] | None = None  # zipf: corpus word frequencies
    ppl_fn: Callable[[list[np.ndarray]], list[float]] | None = None  # perplexity: scores windows
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SelectionMethod:
    """`local(windows, k, ctx, shard_key)` and `merge(windows, k, ctx)` each return chosen windows
    (with `score` set) in selection order. `needs` names extra inputs: "text", "word_freq", "model"."""

    local: Callable[[list[Window], int, SelectContext, str], list[Window]]
    merge: Callable[[list[Window], int, SelectContext], list[Window]]
    needs: frozenset[str] = frozenset()
    source: str = ""


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from any values, stable across processes (unlike hash())."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def top_k(windows: list[Window], k: int, largest: bool) -> list[Window]:
    """The k best by score, ties broken by uid, so the order is deterministic."""
    key = (lambda w: (-w.score, w.uid)) if largest else (lambda w: (w.score, w.uid))
    return sorted(windows, key=key)[:k]
