"""Evaluation results for reports: read either results.json shape, and compute deltas and retention.

The current shape (written by the evaluate stage) is, per model label::

    {"seconds": s, "tasks": {task: {"domain", "kind", "group", "primary", "higher_is_better",
                                    "metrics", "stderr", "n"}},
     "groups": {group: {"domain", "members", "metrics", "stderr"}}}

Older runs wrote ``{task: {"perplexity" | "acc", "acc_stderr", ..., "domain"}, "_seconds": s}``;
`normalize_results` converts them so that old runs still report.

Retention of a metric is the compressed value relative to the reference (dense) one, oriented so
that 1.0 means no loss: compressed / dense when higher is better (accuracy), dense / compressed
when lower is better (perplexity). Standard errors of differences and ratios treat the two models
as independent samples (an upper bound when both are scored on the same items).
"""
from __future__ import annotations

import math
from collections import Counter

# old-shape metric -> (task kind, is it higher-is-better); the first one found is the primary
_OLD_PRIMARY = {"perplexity": ("perplexity", False), "acc": ("multiple_choice", True)}
_OLD_METRICS = {"perplexity": False, "acc": True, "acc_norm": True}
_LOWER_IS_BETTER_WORDS = ("perplexity", "nll", "loss", "bits_per", "error")


def higher_is_better(metric: str) -> bool:
    """Default orientation of a metric from its name (perplexities and losses: lower is better)."""
    return not any(w in metric for w in _LOWER_IS_BETTER_WORDS)


def _from_old_task(task: dict) -> dict:
    primary = next((m for m in _OLD_PRIMARY if m in task), None)
    if primary is None:
        raise ValueError(f"old-shape task has none of the metrics {sorted(_OLD_PRIMARY)}: keys {sorted(task)}")
    metrics = {m: float(task[m]) for m in _OLD_METRICS if m in task}
    return {"domain": task.get("domain", "general"), "kind": _OLD_PRIMARY[primary][0], "group": None,
            "primary": primary, "higher_is_better": {m: _OLD_METRICS[m] for m in metrics},
            "metrics": metrics,
            "stderr": {m: float(task[f"{m}_stderr"]) for m in metrics if f"{m}_stderr" in task},
            "n": int(task.get("n", task.get("windows", 0)))}


def _group_with_primary(group: dict, units: dict) -> dict:
    """A group record with `primary` (the primary metric most common among its members, tasks or
    groups, that the group reports; ties go to higher-is-better metrics such as accuracy) and
    `higher_is_better` (taken from the members)."""
    if group.get("primary"):
        return group
    members = [units[m] for m in group.get("members") or [] if m in units]
    hib = {m: v for t in members for m, v in (t.get("higher_is_better") or {}).items()}
    counts = Counter(t["primary"] for t in members if t.get("primary") in (group.get("metrics") or {}))
    ranked = sorted(counts, key=lambda m: (-counts[m], not hib.get(m, higher_is_better(m))))
    first = next(iter(group.get("metrics") or {}), None)
    return {**group, "primary": ranked[0] if ranked else first,
            "higher_is_better": {**hib, **(group.get("higher_is_better") or {})}}


def _normalize_model(block: dict) -> dict:
    if isinstance(block.get("tasks"), dict):
        tasks = {name: {"group": None, "stderr": {}, "higher_is_better": {}, **t} for name, t in block["tasks"].items()}
        groups: dict[str, dict] = {}
        for name, g in (block.get("groups") or {}).items():  # task groups come before the domain groups using them
            groups[name] = _group_with_primary(g, {**tasks, **groups})
        return {"seconds": block.get("seconds"), "tasks": tasks, "groups": groups}
    tasks = {name: _from_old_task(t) for name, t in block.items() if not name.startswith("_")}
    return {"seconds": block.get("_seconds"), "tasks": tasks, "groups": {}}


def normalize_results(raw: dict) -> dict:
    """`evaluate/results.json` (either shape) -> {label: {"seconds", "tasks", "groups"}} (current shape).

    Raises:
        ValueError: an old-shape task carries neither `perplexity` nor `acc`.
    """
    return {label: _normalize_model(block) for label, block in raw.items()}


def reference_label(models: dict) -> str | None:
    """The model others are compared with: `dense` when present, else none (nothing to compare)."""
    return "dense" if "dense" in models and len(models) > 1 else None


def primary(entry: dict, metric: str | None = None) -> tuple[str, float | None, float | None, bool]:
    """(metric, value, stderr or None, higher is better) of a task or group entry.

    An entry without `primary` (normalize_results gives groups their members') uses its first metric.
    """
    metrics = entry.get("metrics") or {}
    name = metric or entry.get("primary") or next(iter(metrics), "")
    hib = (entry.get("higher_is_better") or {}).get(name, higher_is_better(name))
    se = (entry.get("stderr") or {}).get(name)
    value = metrics.get(name)
    return name, (None if value is None else float(value)), (None if se is None else float(se)), bool(hib)


def delta(ref: dict, other: dict) -> tuple[float | None, float | None]:
    """(other - ref, its standard error or None) on the reference entry's primary metric."""
    name, a, sa, _ = primary(ref)
    _, b, sb, _ = primary(other, name)
    if a is None or b is None:
        return None, None
    se = math.sqrt(sa ** 2 + sb ** 2) if sa is not None and sb is not None else None
    return b - a, se


def retention(ref: dict, other: dict) -> tuple[float | None, float | None]:
    """(retention, stderr or None): 1.0 = no loss, < 1 = worse than the reference.

    r = other / ref (higher is better) or ref / other (lower is better); None when the divisor is
    0. Stderr by the delta method: for r = x / y, sqrt((s_x / y)^2 + (x s_y / y^2)^2).
    """
    name, a, sa, hib = primary(ref)
    _, b, sb, _ = primary(other, name)
    if a is None or b is None:
        return None, None
    (x, sx), (y, sy) = ((b, sb), (a, sa)) if hib else ((a, sa), (b, sb))
    if y == 0:
        return None, None
    if sx is None or sy is None:
        return x / y, None
    return x / y, math.sqrt((sx / y) ** 2 + (x * sy / y ** 2) ** 2)


def retention_units(model: dict) -> dict[str, dict]:
    """What a domain's retention averages: ungrouped tasks, and each task group once (so 57 MMLU
    subjects weigh as one group), as {name: entry}."""
    named = {t.get("group") for t in model["tasks"].values()} - {None}
    return {**{n: t for n, t in model["tasks"].items() if not t.get("group")},
            **{g: e for g, e in model["groups"].items() if g in named}}


def domain_retention(models: dict, ref: str, label: str) -> dict:
    """{domain: {"retention": mean over its units, "stderr", "tasks": {unit: retention}}} for `label`;
    units are `retention_units` (ungrouped tasks and task groups).

    The mean's standard error is sqrt(sum se_i^2) / k over its k units; units without a standard
    error (perplexities over many tokens) count as exact. None when no unit has one.
    """
    per: dict[str, dict] = {}
    ref_units = retention_units(models[ref])
    for name, entry in retention_units(models[label]).items():
        r, se = retention(ref_units[name], entry) if name in ref_units else (None, None)
        if r is not None:
            per.setdefault(entry.get("domain", "general"), {})[name] = (r, se)
    out = {}
    for domain, units in sorted(per.items(), key=lambda kv: (kv[0] != "general", kv[0])):
        ses = [se for _, se in units.values() if se is not None]
        out[domain] = {"retention": sum(r for r, _ in units.values()) / len(units),
                       "stderr": math.sqrt(sum(s * s for s in ses)) / len(units) if ses else None,
                       "tasks": {t: {"retention": r, "stderr": se} for t, (r, se) in units.items()}}
    return out


def comparisons(models: dict) -> dict:
    """{label: {"tasks": {task: {delta, delta_stderr, retention, retention_stderr}}, "groups": ..., "domains": ...}}
    for every model other than the reference; {} when there is no reference."""
    ref = reference_label(models)
    if ref is None:
        return {}
    out = {}
    for label in models:
        if label == ref:
            continue
        out[label] = {"domains": domain_retention(models, ref, label)}
        for part in ("tasks", "groups"):
            rows = {}
            for name, entry in models[label][part].items():
                ref_entry = models[ref][part].get(name)
                if ref_entry is None:
                    continue
                d, dse = delta(ref_entry, entry)
                r, rse = retention(ref_entry, entry)
                rows[name] = {"delta": d, "delta_stderr": dse, "retention": r, "retention_stderr": rse}
            out[label][part] = rows
    return out


def fmt_value(value: float | None, se: float | None = None, signed: bool = False) -> str:
    """`value ± se` with 4 significant-ish decimals; '–' when missing."""
    if value is None:
        return "–"
    digits = 2 if abs(value) >= 100 else 4 if abs(value) < 10 else 3
    text = f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return text + (f" ± {se:.{digits}f}" if se is not None else "")
