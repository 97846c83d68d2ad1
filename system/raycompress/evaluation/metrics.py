"""Metrics with standard errors, as lm-evaluation-harness reports them.

acc: the choice with the highest summed log-likelihood is the label.
acc_norm: the same after dividing each choice's log-likelihood by its length in bytes
(lm-eval's `acc_norm`). Standard error of a mean of 0/1 outcomes: sqrt(p(1-p)/(n-1))
(lm-eval's `mean_stderr`, sample standard deviation over sqrt(n)).
"""
from __future__ import annotations

import math


def mean_stderr(xs: list[float]) -> float:
    n = len(xs)
    if n < 2:
        return float("nan")
    mu = sum(xs) / n
    var = sum((x - mu) ** 2 for x in xs) / (n - 1)
    return math.sqrt(var / n)


def mc_metrics(lls: list[list[float]], choices: list[tuple[str, ...]], labels: list[int]) -> dict:
    """acc and acc_norm with standard errors over items.

    Args:
        lls: per item, the log-likelihood of each choice.
        choices: per item, the choice strings (for byte-length normalisation).
        labels: per item, the index of the right choice.
    """
    acc, acc_norm = [], []
    for ll, ch, y in zip(lls, choices, labels):
        acc.append(float(max(range(len(ll)), key=lambda i: ll[i]) == y))
        normed = [l / max(1, len(c.encode("utf-8"))) for l, c in zip(ll, ch)]
        acc_norm.append(float(max(range(len(normed)), key=lambda i: normed[i]) == y))
    return {"acc": sum(acc) / len(acc), "acc_stderr": mean_stderr(acc),
            "acc_norm": sum(acc_norm) / len(acc_norm), "acc_norm_stderr": mean_stderr(acc_norm), "n": len(acc)}


def perplexity_metrics(nll: float, tokens: int) -> dict:
    """Token-level perplexity exp(NLL / tokens) with the counts it came from."""
    return {"perplexity": math.exp(nll / max(1, tokens)), "nll": nll, "tokens": tokens}
