"""report.sweep: the points table and the findings in words, from a hand-built sweep report."""
from raycompress.report.sweep import findings, render_markdown, rows


def _point(gen, bio, sd, dominated, distinct=3):
    ms = lambda m: {"mean": m, "sd": sd, "n": 3}  # noqa: E731
    return {"variants": {}, "n": 3, "seeds": [0, 1, 2], "distinct_calibrations": distinct, "dominated_by": dominated,
            "tasks": {"wiki": ms(30.0 / gen)}, "retention": {"general": ms(gen), "biomed": ms(bio)},
            "domain_ppl": ms(1.0), "general_ppl": ms(1.0)}


REPORT = {"sweep": "s", "domain": "biomed", "seconds": 10.0, "points_at_once": 2, "seeds": [0, 1, 2], "runs": 9,
          "errors": {}, "missing": [],
          "points": {"pure": _point(0.80, 0.95, 0.01, []), "mix": _point(0.85, 0.94, 0.01, []),
                     "bad": _point(0.70, 0.80, 0.0, ["mix", "pure"], distinct=1)},
          "seed_noise": {"domain_ppl": 0.012, "general_ppl": 0.008},
          "verdicts": {"general": {"best": "mix", "beaten": ["bad", "pure"], "within": [], "unknown": []},
                       "biomed": {"best": "pure", "beaten": ["bad"], "within": ["mix"], "unknown": []}}}


def test_rows_sorted_by_domain_retention_with_pareto_status():
    header, body = rows(REPORT)
    assert header == ["point", "seeds", "wiki", "retention general", "retention biomed", "Pareto"]
    assert [r[0] for r in body] == ["pure", "mix", "bad"]
    assert body[0][-1] == "front" and body[2][-1] == "dominated by mix, pure"
    assert body[1][3] == "0.8500 ± 0.0100"


def test_findings_say_noise_best_within_and_identical_calibrations():
    text = "\n".join(findings(REPORT))
    assert "domain perplexity 1.20%, general perplexity 0.80%" in text
    assert "Best biomed retention: pure (0.9500 ± 0.0100)" in text and "Within seed noise of it" in text
    assert "selected the same calibration set for bad" in text
    assert "Pareto front (general vs biomed retention, means): mix, pure." in text
    assert "| pure | 3 |" in render_markdown(REPORT)
