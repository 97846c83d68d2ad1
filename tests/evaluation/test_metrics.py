"""evaluation.metrics: stderr, acc vs acc_norm, perplexity."""
import math

from raycompress.evaluation.metrics import mc_metrics, mean_stderr, perplexity_metrics


def test_mean_stderr_known_value():
    # mean .75, sample var = (3 * .0625 + .5625) / 3 = .25, stderr = sqrt(.25 / 4) = .25
    assert mean_stderr([1.0, 0.0, 1.0, 1.0]) == 0.25
    assert mean_stderr([1.0, 1.0]) == 0.0
    assert math.isnan(mean_stderr([1.0]))


def test_acc_vs_acc_norm_flip():
    # choice 0 " a" (2 bytes, ll -2): per byte -1.0; choice 1 " abcdefgh" (9 bytes, ll -3): per byte -0.33
    lls = [[-2.0, -3.0], [-1.0, -5.0]]
    choices = [(" a", " abcdefgh"), (" x", " y")]
    m = mc_metrics(lls, choices, [1, 0])
    assert m["acc"] == 0.5  # item 0 wrong by raw ll, item 1 right
    assert m["acc_norm"] == 1.0
    assert m["n"] == 2
    assert m["acc_stderr"] == mean_stderr([0.0, 1.0]) == 0.5
    assert m["acc_norm_stderr"] == 0.0


def test_acc_norm_counts_utf8_bytes():
    # " é" is 3 bytes, " ab" is 3 bytes: equal normalisation, raw order kept
    m = mc_metrics([[-3.0, -2.9]], [(" é", " ab")], [1])
    assert m["acc"] == 1.0 and m["acc_norm"] == 1.0
    # " éé" is 5 bytes vs " a" 2 bytes: -4/5 > -2/2
    m = mc_metrics([[-4.0, -2.0]], [(" éé", " a")], [0])
    assert m["acc"] == 0.0 and m["acc_norm"] == 1.0


def test_perplexity_metrics():
    m = perplexity_metrics(20.0, 10)
    assert m == {"perplexity": math.exp(2.0), "nll": 20.0, "tokens": 10}
