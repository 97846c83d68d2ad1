"""Metrics by name, with standard errors, and group averages; definitions follow
lm-evaluation-harness (lm_eval/api/metrics.py, lm_eval/api/task.py).

A multiple-choice metric maps per-item (choice log-likelihoods, choice strings, gold index) to a
0/1 outcome; the task value is the mean and its standard error the sample standard deviation over
sqrt(n) (lm-eval's `mean_stderr`). A perplexity metric aggregates per-document
(log-likelihood, words, bytes, tokens) into one number (lm-eval's `weighted_perplexity`,
`bits_per_byte`); no standard error is reported for those (as lm-eval).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from raycompress.registry import Registry


@dataclass(frozen=True)
class Metric:
    kind: str  # "multiple_choice" or "perplexity"
    higher_is_better: bool
    fn: Callable  # MC: (lls, choices, gold) -> 0/1; perplexity: (ll, words, bytes, tokens) sums -> value


METRICS: Registry[Metric] = Registry("metric", "raycompress.evaluation.metrics")


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: xs[i])  # the first maximum, as numpy's argmax


METRICS.register("acc")(Metric("multiple_choice", True, lambda lls, ch, y: float(_argmax(lls) == y)))
# acc_norm: each choice's log-likelihood divided by its length in characters (lm-eval's
# `completion_len`: the choice text without the target delimiter).
METRICS.register("acc_norm")(Metric("multiple_choice", True, lambda lls, ch, y: float(
    _argmax([ll / max(1, len(c)) for ll, c in zip(lls, ch)]) == y)))
METRICS.register("word_perplexity")(Metric("perplexity", False, lambda ll, w, b, t: math.exp(-ll / w)))
METRICS.register("byte_perplexity")(Metric("perplexity", False, lambda ll, w, b, t: math.exp(-ll / b)))
METRICS.register("bits_per_byte")(Metric("perplexity", False, lambda ll, w, b, t: -ll / b / math.log(2)))
METRICS.register("token_perplexity")(Metric("perplexity", False, lambda ll, w, b, t: math.exp(-ll / t)))

DEFAULT_METRICS = {"multiple_choice": ["acc", "acc_norm"],
                   "perplexity": ["word_perplexity", "byte_perplexity", "bits_per_byte", "token_perplexity"]}


def mean_stderr(xs: list[float]) -> float:
    """Standard error of a mean: sample standard deviation / sqrt(n); NaN for n < 2."""
    n = len(xs)
    if n < 2:
        return float("nan")
    mu = sum(xs) / n
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1) / n)


def mc_outcomes(names: list[str], lls: list[list[float]], choices: list[list[str]], gold: list[int]) -> dict[str, list[float]]:
    """Per metric, the 0/1 outcome of every item. lls[i][j]: log-likelihood of choice j of item i."""
    return {m: [METRICS.get(m).fn(l, c, y) for l, c, y in zip(lls, choices, gold)] for m in names}


def mc_summary(outcomes: dict[str, list[float]]) -> tuple[dict[str, float], dict[str, float]]:
    """(metrics, stderr): the mean of each metric's outcomes and its standard error (left out for n < 2)."""
    stderr = {m: mean_stderr(v) for m, v in outcomes.items()}
    return ({m: sum(v) / len(v) for m, v in outcomes.items()}, {m: se for m, se in stderr.items() if not math.isnan(se)})


def perplexity_summary(names: list[str], docs: list[tuple[float, int, int, int]]) -> dict[str, float]:
    """Each named perplexity metric over documents (log-likelihood nats, words, bytes, tokens)."""
    ll, words, nbytes, tokens = (sum(d[i] for d in docs) for i in range(4))
    return {m: METRICS.get(m).fn(ll, max(1, words), max(1, nbytes), max(1, tokens)) for m in names}


def macro_average(members: list[dict]) -> tuple[dict[str, float], dict[str, float]]:
    """Unweighted mean over member results of every metric any member reports; the standard error
    sqrt(sum se_i^2) / k of k independent means, when every member reporting it has one."""
    metrics, stderr = {}, {}
    for name in sorted({m for r in members for m in r["metrics"]}):
        have = [r for r in members if name in r["metrics"]]
        metrics[name] = sum(r["metrics"][name] for r in have) / len(have)
        ses = [r.get("stderr", {}).get(name) for r in have]
        if all(se is not None and not math.isnan(se) for se in ses):
            stderr[name] = math.sqrt(sum(se * se for se in ses)) / len(have)
    return metrics, stderr
