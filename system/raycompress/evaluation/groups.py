"""Group averages: a task `group` (e.g. mmlu_biomed) and one `domain:<tag>` group per domain tag.

A task group whose members are all multiple choice is averaged over the union of their items
(size-weighted, lm-eval's `weight_by_size`), its standard error computed on those pooled 0/1
outcomes; otherwise members are averaged unweighted. A domain group averages, unweighted, the
ungrouped tasks of that domain and the task groups whose members all carry that domain.
"""
from __future__ import annotations

from raycompress.evaluation.metrics import macro_average, mc_summary


def _task_group(names: list[str], records: dict[str, dict], outcomes: dict[str, dict]) -> dict:
    members = [records[n] for n in names]
    domains = sorted({r["domain"] for r in members})
    common = set.intersection(*(set(outcomes[n]) for n in names))
    if all(r["kind"] == "multiple_choice" for r in members) and common:
        pooled = {m: [x for n in names for x in outcomes[n][m]] for m in sorted(common)}
        metrics, stderr = mc_summary(pooled)
    else:
        metrics, stderr = macro_average(members)
    return {"domain": domains[0] if len(domains) == 1 else "mixed", "members": names,
            "metrics": metrics, "stderr": stderr, "n": sum(r["n"] for r in members)}


def group_results(records: dict[str, dict], outcomes: dict[str, dict]) -> dict[str, dict]:
    """{group name: {"domain", "members", "metrics", "stderr", "n"}} for task groups and domains.

    Args:
        records: task name -> the task's result record (`finalize_task`), in job order.
        outcomes: task name -> {metric: per-item 0/1 outcomes} (empty for perplexity tasks).
    """
    by_group: dict[str, list[str]] = {}
    for name, rec in records.items():
        if rec.get("group"):
            by_group.setdefault(rec["group"], []).append(name)
    groups = {g: _task_group(names, records, outcomes) for g, names in by_group.items()}
    units = {**{n: r for n, r in records.items() if not r.get("group")}, **groups}
    for tag in sorted({r["domain"] for r in units.values()} - {"mixed"}):
        names = [n for n, r in units.items() if r["domain"] == tag]
        metrics, stderr = macro_average([units[n] for n in names])
        groups[f"domain:{tag}"] = {"domain": tag, "members": names, "metrics": metrics, "stderr": stderr,
                                   "n": sum(units[n]["n"] for n in names)}
    return groups
