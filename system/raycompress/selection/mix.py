"""MixCal-style mixing: split n_samples over named sources by their shares (largest remainder)."""
from __future__ import annotations

import math


def quotas(n: int, mix: dict[str, float]) -> dict[str, int]:
    """Integer sample counts per source summing to `n`, proportional to `mix` (largest remainder,
    ties by source name). E.g. quotas(64, {"biomed": .75, "general": .25}) == {"biomed": 48, "general": 16}."""
    raw = {name: n * share for name, share in mix.items()}
    out = {name: math.floor(v) for name, v in raw.items()}
    rest = n - sum(out.values())
    for name in sorted(raw, key=lambda s: (-(raw[s] - out[s]), s))[:rest]:
        out[name] += 1
    return out
