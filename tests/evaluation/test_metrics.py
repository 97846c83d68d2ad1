"""evaluation.metrics / groups: stderr, acc vs acc_norm (characters, as lm-eval), perplexities, groups."""
import math

import pytest

from raycompress.evaluation.groups import group_results
from raycompress.evaluation.metrics import mc_outcomes, mc_summary, mean_stderr, perplexity_summary


def test_mean_stderr_known_value():
    # mean .75, sample var = (3 * .0625 + .5625) / 3 = .25, stderr = sqrt(.25 / 4) = .25
    assert mean_stderr([1.0, 0.0, 1.0, 1.0]) == 0.25
    assert mean_stderr([1.0, 1.0]) == 0.0
    assert math.isnan(mean_stderr([1.0]))


def test_acc_vs_acc_norm_flip():
    # choice 0 "a" (1 char, ll -2): -2 per char; choice 1 "abcdefgh" (8 chars, ll -3): -0.375
    out = mc_outcomes(["acc", "acc_norm"], [[-2.0, -3.0], [-1.0, -5.0]], [["a", "abcdefgh"], ["x", "y"]], [1, 0])
    assert out == {"acc": [0.0, 1.0], "acc_norm": [1.0, 1.0]}
    metrics, stderr = mc_summary(out)
    assert metrics == {"acc": 0.5, "acc_norm": 1.0}
    assert stderr == {"acc": 0.5, "acc_norm": 0.0}


def test_acc_norm_counts_characters_not_bytes():
    # "éé" is 2 characters (4 bytes), "ab" 2 characters: equal normalisation keeps the raw order
    assert mc_outcomes(["acc_norm"], [[-3.0, -2.9]], [["éé", "ab"]], [1])["acc_norm"] == [1.0]


def test_ties_pick_the_first_choice():
    assert mc_outcomes(["acc"], [[-1.0, -1.0]], [["a", "b"]], [0])["acc"] == [1.0]


def test_perplexity_summary():
    # two documents: ll -10 and -20 nats; 5 + 10 words, 30 + 60 bytes, 8 + 12 tokens
    m = perplexity_summary(["word_perplexity", "byte_perplexity", "bits_per_byte", "token_perplexity"],
                           [(-10.0, 5, 30, 8), (-20.0, 10, 60, 12)])
    assert m["word_perplexity"] == pytest.approx(math.exp(2.0))
    assert m["byte_perplexity"] == pytest.approx(math.exp(1 / 3))
    assert m["bits_per_byte"] == pytest.approx(1 / 3 / math.log(2))
    assert m["token_perplexity"] == pytest.approx(math.exp(1.5))


def _rec(domain, kind, metrics, stderr, n, group=None):
    return {"domain": domain, "kind": kind, "group": group, "metrics": metrics, "stderr": stderr, "n": n}


def test_groups_pool_items_and_average_domains():
    records = {
        "a": _rec("biomed", "multiple_choice", {"acc": 1.0}, {"acc": 0.0}, 2, "g"),
        "b": _rec("biomed", "multiple_choice", {"acc": 0.0}, {"acc": 0.0}, 2, "g"),
        "c": _rec("biomed", "multiple_choice", {"acc": 0.5}, {"acc": 0.5}, 2),
        "p": _rec("general", "perplexity", {"word_perplexity": 10.0}, {}, 3),
    }
    outcomes = {"a": {"acc": [1.0, 1.0]}, "b": {"acc": [0.0, 0.0]}, "c": {"acc": [1.0, 0.0]}, "p": {}}
    groups = group_results(records, outcomes)
    assert groups["g"]["members"] == ["a", "b"] and groups["g"]["metrics"] == {"acc": 0.5}
    assert groups["g"]["stderr"]["acc"] == pytest.approx(mean_stderr([1.0, 1.0, 0.0, 0.0]))
    assert groups["domain:biomed"]["members"] == ["c", "g"]
    assert groups["domain:biomed"]["metrics"]["acc"] == 0.5
    assert groups["domain:general"]["metrics"] == {"word_perplexity": 10.0}
