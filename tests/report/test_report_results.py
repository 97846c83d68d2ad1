"""results.json in the old shape still reports; delta and retention orientation and standard errors."""
from __future__ import annotations

import json
import math

import pytest
from reportfixtures import tokenizer_dir, write_run

from raycompress.report.report import build_report
from raycompress.report.results import delta, normalize_results, retention

OLD = {  # the shape of runs/demo/evaluate/results.json
    "dense": {"wikitext2": {"perplexity": 20.0, "nll": 5.0, "tokens": 100, "domain": "general", "windows": 4},
              "pubmedqa": {"acc": 0.5, "acc_stderr": 0.05, "acc_norm": 0.6, "acc_norm_stderr": 0.04, "n": 100,
                           "domain": "biomed"},
              "_seconds": 10.0},
    "compressed": {"wikitext2": {"perplexity": 25.0, "nll": 6.0, "tokens": 100, "domain": "general", "windows": 4},
                   "pubmedqa": {"acc": 0.4, "acc_stderr": 0.05, "acc_norm": 0.5, "acc_norm_stderr": 0.05, "n": 100,
                                "domain": "biomed"},
                   "_seconds": 11.0},
}


def test_old_shape_is_converted():
    models = normalize_results(OLD)
    assert set(models) == {"dense", "compressed"} and models["dense"]["seconds"] == 10.0
    ppl = models["dense"]["tasks"]["wikitext2"]
    assert ppl["kind"] == "perplexity" and ppl["primary"] == "perplexity" and ppl["higher_is_better"]["perplexity"] is False
    assert ppl["metrics"] == {"perplexity": 20.0} and ppl["stderr"] == {} and ppl["n"] == 4
    mc = models["compressed"]["tasks"]["pubmedqa"]
    assert mc["kind"] == "multiple_choice" and mc["primary"] == "acc" and mc["domain"] == "biomed"
    assert mc["metrics"] == {"acc": 0.4, "acc_norm": 0.5} and mc["stderr"] == {"acc": 0.05, "acc_norm": 0.05}
    assert models["dense"]["groups"] == {}


def test_old_task_without_a_known_metric_names_its_keys():
    with pytest.raises(ValueError, match="bleu"):
        normalize_results({"dense": {"t": {"bleu": 1.0, "domain": "general"}}})


def test_retention_is_one_for_no_loss_and_oriented_by_metric():
    models = normalize_results(OLD)
    d, c = models["dense"]["tasks"], models["compressed"]["tasks"]
    assert retention(d["wikitext2"], c["wikitext2"]) == (pytest.approx(0.8), None)  # dense / compressed
    r, se = retention(d["pubmedqa"], c["pubmedqa"])  # compressed / dense
    assert r == pytest.approx(0.8) and se == pytest.approx(0.8 * math.sqrt(0.1 ** 2 + 0.125 ** 2))
    assert retention(d["pubmedqa"], d["pubmedqa"])[0] == pytest.approx(1.0)
    assert delta(d["pubmedqa"], c["pubmedqa"]) == (pytest.approx(-0.1), pytest.approx(math.sqrt(2) * 0.05))


def test_a_run_with_old_results_still_reports(tmp_path):
    out = write_run(tmp_path / "run", tokenizer_dir(tmp_path / "tok"))
    (out / "evaluate" / "results.json").write_text(json.dumps(OLD))
    report = build_report(out)
    assert report["job"] == "demo"
    assert report["comparisons"]["compressed"]["tasks"]["wikitext2"]["retention"] == pytest.approx(0.8)
    assert set(report["comparisons"]["compressed"]["domains"]) == {"general", "biomed"}


def test_groups_take_their_members_primary_metric():
    task = {"domain": "general", "kind": "multiple_choice", "primary": "acc_norm", "higher_is_better": {"acc_norm": True},
            "metrics": {"acc": 0.5, "acc_norm": 0.6}, "stderr": {}, "n": 10}
    ppl = {"domain": "general", "kind": "perplexity", "primary": "word_perplexity",
           "higher_is_better": {"word_perplexity": False}, "metrics": {"word_perplexity": 20.0}, "n": 3}
    group = {"domain": "general", "members": ["a", "b", "c"], "stderr": {},
             "metrics": {"acc": 0.5, "acc_norm": 0.6, "word_perplexity": 20.0}}
    models = normalize_results({"dense": {"tasks": {"a": task, "b": task, "c": ppl}, "groups": {"domain:general": group}}})
    g = models["dense"]["groups"]["domain:general"]
    assert g["primary"] == "acc_norm" and g["higher_is_better"] == {"acc_norm": True, "word_perplexity": False}
    assert models["dense"]["tasks"]["c"]["group"] is None and models["dense"]["tasks"]["c"]["stderr"] == {}


def test_domain_groups_count_member_groups_and_prefer_accuracy_on_ties():
    mc = {"domain": "biomed", "kind": "multiple_choice", "primary": "acc", "higher_is_better": {"acc": True},
          "metrics": {"acc": 0.5}, "stderr": {"acc": 0.1}, "n": 10}
    ppl = {"domain": "biomed", "kind": "perplexity", "primary": "word_perplexity",
           "higher_is_better": {"word_perplexity": False}, "metrics": {"word_perplexity": 20.0}, "n": 3}
    groups = {"g": {"domain": "biomed", "members": ["a"], "metrics": {"acc": 0.5}, "stderr": {}},
              "domain:biomed": {"domain": "biomed", "members": ["p", "g"], "stderr": {},
                                "metrics": {"acc": 0.5, "word_perplexity": 20.0}}}
    models = normalize_results({"dense": {"tasks": {"a": mc, "p": ppl}, "groups": groups}})
    assert models["dense"]["groups"]["domain:biomed"]["primary"] == "acc"


def test_retention_of_a_zero_score_is_zero_with_a_stderr():
    ref = {"primary": "acc", "metrics": {"acc": 0.25}, "stderr": {"acc": 0.1}}
    zero = {"primary": "acc", "metrics": {"acc": 0.0}, "stderr": {"acc": 0.0}}
    assert retention(ref, zero) == (0.0, pytest.approx(0.0))
    assert retention(zero, ref) == (None, None)  # nothing to be relative to
    r, se = retention(ref, {**zero, "stderr": {"acc": 0.05}})
    assert r == 0.0 and se == pytest.approx(0.05 / 0.25)
