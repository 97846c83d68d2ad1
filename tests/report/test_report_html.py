"""report.json / report.md / report.html of one run folder: every task and model, deltas, embedded plots."""
from __future__ import annotations

import base64
import json
import re

import pytest
from reportfixtures import TASKS, tokenizer_dir, write_run

from conftest import WORDS
from raycompress.report.report import write_report


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return tokenizer_dir(tmp_path_factory.mktemp("report_tok"))


@pytest.fixture
def run_dir(tmp_path, tok_dir):
    out = write_run(tmp_path / "run", tok_dir)
    assert write_report(None, out) == ["report.json", "report.md", "report.html"]
    return out


def test_html_has_every_task_model_delta_and_stderr(run_dir):
    html = (run_dir / "report.html").read_text()
    for name in list(TASKS) + ["mmlu_biomed", "domain:general", "dense", "compressed"]:
        assert f">{name}<" in html, name
    # piqa: dense 0.66 ± 0.03, compressed 0.594 ± 0.03 -> delta -0.066 ± sqrt(2)·0.03, retention 0.9
    assert "0.6600 ± 0.0300" in html and "0.5940 ± 0.0300" in html
    assert "-0.0660 ± 0.0424" in html and "0.9000 ± 0.0612" in html
    # perplexity: lower is better, retention = dense / compressed = 1 / 1.1
    assert "+2.800" in html and "0.9091" in html
    assert "1.0 = no loss" in html and "dense / compressed for perplexity" in html


def test_html_is_self_contained_with_embedded_plots(run_dir):
    html = (run_dir / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) >= 4  # retention per domain, per task, per layer, calibration
    assert all(base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n" for b in images)
    assert "<style>" in html and "<script" not in html
    assert not re.search(r'(src|href)="(https?:)?//', html)


def test_report_json_has_layers_retention_and_calibration(run_dir):
    report = json.loads((run_dir / "report.json").read_text())
    assert [lay["layer"] for lay in report["compression"]["layers"]] == [0, 1, 2]
    assert report["compression"]["layers"][2]["modules"]["mlp.down_proj"]["rel_error"] == pytest.approx(0.03)
    domains = report["comparisons"]["compressed"]["domains"]
    assert set(domains) == {"general", "biomed"}
    assert domains["general"]["retention"] == pytest.approx((1 / 1.1 + 0.9) / 2)
    assert set(domains["biomed"]["tasks"]) == {"biomed_abstracts", "mmlu_biomed"}  # a task group counts once
    assert domains["biomed"]["retention"] == pytest.approx((1 / 1.1 + 0.9) / 2)
    cal = report["calibration"]
    assert cal["sources"]["biomed"]["sequences"] == 6 and cal["sources"]["general"]["sequences"] == 2
    assert cal["skipped"] == {"biomed": {"malformed_json": 2}}
    concepts = [c["text"] for c in cal["top_concepts"]["items"]]
    assert concepts and set(concepts) <= set(WORDS), concepts
    assert set(cal["top_concepts"]["by_source"]) == {"biomed", "general"}


def test_markdown_lists_tasks_groups_and_stages(run_dir):
    md = (run_dir / "report.md").read_text()
    for name in TASKS:
        assert f"| {name} |" in md
    assert "| mmlu_biomed |" in md and "| compress | 9.0 | 900 |" in md


def test_without_dense_model_the_page_says_so(tmp_path, tok_dir):
    out = write_run(tmp_path / "run", tok_dir)
    res = json.loads((out / "evaluate" / "results.json").read_text())
    (out / "evaluate" / "results.json").write_text(json.dumps({"compressed": res["compressed"]}))
    write_report(None, out)
    assert "No dense model in this run" in (out / "report.html").read_text()
    assert "No dense model in this run" in (out / "report.md").read_text()


def test_without_tokenizer_concepts_are_skipped_with_a_note(tmp_path, tok_dir):
    out = write_run(tmp_path / "run", tok_dir)
    cfg = json.loads((out / "job.json").read_text())
    (out / "job.json").write_text(json.dumps({**cfg, "model": str(tmp_path / "missing")}))
    write_report(None, out)
    concepts = json.loads((out / "report.json").read_text())["calibration"]["top_concepts"]
    assert concepts["items"] == [] and "no tokenizer.json" in concepts["note"]
    assert "no tokenizer.json" in (out / "report.html").read_text()


def _table_after(html: str, heading: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the first table after `heading`, cell text unescaped."""
    from html import unescape

    part = html.split(heading, 1)[1].split("</table>", 1)[0]
    header = [unescape(h) for h in re.findall(r"<th>(.*?)</th>", part)]
    rows = [[unescape(c) for c in re.findall(r"<td>(.*?)</td>", tr)] for tr in re.findall(r"<tr>(.*?)</tr>", part)]
    return header, [r for r in rows if r]


def test_calibration_table_has_a_value_in_every_column(run_dir):
    """Every column of the calibration table is filled from what the select stage writes (the
    fixture's manifest has exactly its keys): no column that is "–" for every source."""
    header, rows = _table_after((run_dir / "report.html").read_text(), "<h2>Calibration set</h2>")
    assert header == ["source", "sequences", "quota", "usable docs", "tokens", "median length", "docs / sequence",
                      "skipped"]
    assert [r[0] for r in rows] == ["biomed", "general"] and all(len(r) == len(header) for r in rows)
    for col, name in enumerate(header):
        assert any(r[col] != "–" for r in rows), f"column {name!r} is empty for every source"
    assert rows[0][1:4] == ["6", "6", "50"] and rows[0][-1] == "malformed_json: 2"
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["calibration"]["sources"]["biomed"]) == {
        "sequences", "quota", "usable_documents", "tokens", "lengths", "docs_per_sequence", "distinct_tokens",
        "median_length"}


def test_error_is_labelled_with_what_the_algorithm_measures(run_dir):
    """SparseGPT's rel_error is ‖WX − ŴX‖²/‖WX‖²; Cus-Prun's is the pruned share of neuron impact,
    and no part of the report calls it a reconstruction error."""
    report = json.loads((run_dir / "report.json").read_text())
    assert report["compression"]["rel_error_measure"]["unit"] == "‖ΔWX‖²/‖WX‖²"
    assert "‖WX − ŴX‖² / ‖WX‖²" in (run_dir / "report.html").read_text()
    mods = [{"layer": i, "module": "mlp", "sparsity": 0.25, "rel_error": 0.1, "seconds": 0.1} for i in range(3)]
    (run_dir / "compress" / "compression.json").write_text(json.dumps({"algorithm": "cus_prun", "modules": mods}))
    write_report(None, run_dir)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["compression"]["rel_error_measure"]["name"] == "pruned share of neuron impact"
    html, md = (run_dir / "report.html").read_text(), (run_dir / "report.md").read_text()
    for text in (html, md):
        assert "mean pruned share of neuron impact 0.1000" in text and "E[a_i²]·‖W_down[:, i]‖²" in text
        assert "reconstruction error" not in text and "‖WX − ŴX‖²" not in text
