"""Sweep statistics (the numbers of `report.sweep`), pure functions of result dicts: per-run figures, mean ± sd over seeds, the
Pareto front of (general retention, domain retention), and whether differences exceed seed noise.

Retention is `report.results.domain_retention` (1.0 = the dense model's quality). The seed noise
of a point is the sample standard deviation (n − 1) of a figure over its seeds. Two points differ
beyond noise on a figure when |mean_a − mean_b| > 2·SE, SE = sqrt(sd_a²/n_a + sd_b²/n_b) (Welch's
standard error of a difference of means; 2·SE is about a 95% two-sided band for many seeds and a
lenient one for 3, so "beyond noise" here is a screen, not a proof).
"""
from __future__ import annotations

import math
import statistics

from raycompress.report.results import domain_retention, normalize_results, primary


def compressed_label(models: dict) -> str:
    """The model a point produced: `recovered` after a train stage, else `compressed`."""
    return "recovered" if "recovered" in models else "compressed"


def run_figures(raw_results: dict, domain: str | None) -> dict:
    """One run's figures from its `evaluate/results.json` with a `dense` entry merged in.

    Returns {"domain": tag, "tasks": {task: primary value}, "retention": {tag: mean retention},
    "domain_ppl", "general_ppl"}: the ppl figures average the primary metric of the perplexity
    tasks with that domain tag (None when there is none).

    Raises:
        KeyError: the results hold no `dense` entry or no compressed model.
    """
    models = normalize_results(raw_results)
    label = compressed_label(models)
    ret = {d: v["retention"] for d, v in domain_retention(models, "dense", label).items()}
    tasks = models[label]["tasks"]
    domain = domain or next((d for d in ret if d != "general"), None)

    def ppl(tag: str | None) -> float | None:
        vals = [primary(t)[1] for t in tasks.values() if t.get("kind") == "perplexity" and t.get("domain") == tag]
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None

    return {"domain": domain, "tasks": {n: primary(t)[1] for n, t in tasks.items()}, "retention": ret,
            "domain_ppl": ppl(domain), "general_ppl": ppl("general")}


def mean_sd(values: list[float | None]) -> dict:
    """{"mean", "sd", "n"} over the values that are not None (sd None below 2 values)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else None, "n": len(vals)}


def aggregate(runs: list[dict]) -> dict:
    """Mean ± sd over a point's seeds of every figure of `run_figures`: {"n", "tasks": {task:
    mean_sd}, "retention": {tag: mean_sd}, "domain_ppl": mean_sd, "general_ppl": mean_sd}."""
    tasks = sorted({t for r in runs for t in r["tasks"]})
    tags = sorted({d for r in runs for d in r["retention"]}, key=lambda d: (d != "general", d))
    return {"n": len(runs), "tasks": {t: mean_sd([r["tasks"].get(t) for r in runs]) for t in tasks},
            "retention": {d: mean_sd([r["retention"].get(d) for r in runs]) for d in tags},
            "domain_ppl": mean_sd([r["domain_ppl"] for r in runs]),
            "general_ppl": mean_sd([r["general_ppl"] for r in runs])}


def beyond_noise(a: dict, b: dict) -> bool | None:
    """Whether two mean_sd figures differ by more than 2 Welch standard errors; None when either
    has fewer than 2 seeds (no noise estimate)."""
    if a["sd"] is None or b["sd"] is None or a["mean"] is None or b["mean"] is None:
        return None
    se = math.sqrt(a["sd"] ** 2 / a["n"] + b["sd"] ** 2 / b["n"])
    return abs(a["mean"] - b["mean"]) > 2 * se


def pareto(points: dict[str, tuple[float, float]]) -> dict[str, list[str]]:
    """{label: labels that dominate it} for (x, y) pairs where larger is better on both; the
    front is the labels with an empty list. A point dominates another when it is at least as good
    on both and better on one."""
    return {p: sorted(q for q, (qx, qy) in points.items()
                      if q != p and qx >= px and qy >= py and (qx > px or qy > py))
            for p, (px, py) in points.items()}


def seed_noise(aggregates: dict[str, dict], figure: str) -> float | None:
    """Mean over points of the relative sd (sd / mean) of `figure` (e.g. "domain_ppl"); None when
    no point has 2 seeds."""
    rel = [a[figure]["sd"] / a[figure]["mean"] for a in aggregates.values()
           if a[figure]["sd"] is not None and a[figure]["mean"]]
    return sum(rel) / len(rel) if rel else None


def verdicts(aggregates: dict[str, dict], tag: str) -> dict | None:
    """For retention on domain `tag`: the best point, and which others it beats beyond seed noise
    and which are within it: {"best", "beaten": [...], "within": [...], "unknown": [...]}."""
    figs = {p: a["retention"].get(tag) for p, a in aggregates.items()}
    figs = {p: f for p, f in figs.items() if f and f["mean"] is not None}
    if not figs:
        return None
    best = max(figs, key=lambda p: figs[p]["mean"])
    out = {"best": best, "beaten": [], "within": [], "unknown": []}
    for p, f in figs.items():
        if p != best:
            b = beyond_noise(figs[best], f)
            out["unknown" if b is None else "beaten" if b else "within"].append(p)
    return out
