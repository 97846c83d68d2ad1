"""Random selection as bottom-k sampling: every window gets a pseudo-random key from
(seed, uid); the k smallest keys are a uniform sample without replacement, and keeping the k
smallest per shard then the k smallest of the union gives exactly the same sample on any number
of shards (Cohen & Kaplan 2007, "Summarizing data using bottom-k sketches")."""
from __future__ import annotations

from raycompress.registry import SELECTORS
from raycompress.selection.base import SelectContext, SelectionMethod, Window, stable_seed, top_k


def _key(ctx: SelectContext, w: Window) -> float:
    return stable_seed(ctx.seed, w.uid) / 2.0**63  # uniform in [0, 1)


def local(windows: list[Window], k: int, ctx: SelectContext, shard_key: str = "") -> list[Window]:
    for w in windows:
        w.score = _key(ctx, w)
    return top_k(windows, k, largest=False)


def merge(windows: list[Window], k: int, ctx: SelectContext) -> list[Window]:
    return top_k(windows, k, largest=False)


SELECTORS.register("random")(SelectionMethod(local, merge, source="bottom-k sampling"))
