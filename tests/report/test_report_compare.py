"""`raycompress report DIR [DIR ...]`: one run rewrites its report; several give one column per run."""
from __future__ import annotations

import json

import pytest
from reportfixtures import TASKS, tokenizer_dir, write_run

from raycompress.cli import main
from raycompress.report.compare import comparison_table, load_runs, run_labels


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    tok = tokenizer_dir(root / "tok")
    return [write_run(root / "zipcal", tok, method="zipcal", loss=0.05),
            write_run(root / "random", tok, method="random", loss=0.2)]


def test_labels_name_the_config_values_that_differ(two_runs, tmp_path):
    runs = load_runs(two_runs)
    assert [r["label"] for r in runs] == ["demo (method=zipcal)", "demo (method=random)"]
    same = run_labels([{"name": "a"}, {"name": "a"}], [tmp_path / "x", tmp_path / "y"])
    assert same == ["a [x]", "a [y]"]  # nothing differs: the folder names tell them apart


def test_comparison_has_one_column_per_run(two_runs):
    runs = load_runs(two_runs)
    header, rows = comparison_table(runs)
    assert header == ["row", "domain", "metric", "dense", "demo (method=zipcal)", "demo (method=random)"]
    by_name = {r[0]: r for r in rows}
    assert set(TASKS) | {"group: mmlu_biomed", "group: domain:general", "retention: general", "retention: biomed",
                         "compression: mean sparsity", "compression: mean relative reconstruction error",
                         "wall time: all stages"} == set(by_name)
    assert by_name["compression: mean sparsity"][4:] == ["0.5000", "0.5000"]
    assert by_name["compression: mean relative reconstruction error"][2] == "‖ΔWX‖²/‖WX‖²"
    # piqa acc_norm: dense 0.66, runs lose 5 % and 20 %
    assert by_name["piqa"][3:] == ["0.6600 ± 0.0300", "0.6270 ± 0.0300", "0.5280 ± 0.0300"]
    assert by_name["retention: general"][4] != by_name["retention: general"][5]


def test_cli_compares_runs_to_stdout_and_html(two_runs, tmp_path, capsys):
    out = tmp_path / "cmp" / "compare.html"
    assert main(["report", *map(str, two_runs), "--output", str(out)]) == 0
    md = capsys.readouterr().out
    assert "| row | domain | metric | dense | demo (method=zipcal) | demo (method=random) |" in md
    html = out.read_text()
    assert "demo (method=zipcal)" in html and "demo (method=random)" in html and "data:image/png;base64," in html
    assert main(["report", *map(str, two_runs), "--output", str(tmp_path / "compare.md")]) == 0
    assert (tmp_path / "compare.md").read_text().startswith("# raycompress comparison of 2 runs")


def test_cli_with_one_dir_rewrites_its_report(tmp_path, capsys):
    run = write_run(tmp_path / "run", tokenizer_dir(tmp_path / "tok"))
    assert main(["report", str(run)]) == 0
    assert "# raycompress report: demo" in capsys.readouterr().out
    assert {p.name for p in run.glob("report.*")} == {"report.json", "report.md", "report.html"}


def test_a_folder_with_only_report_json_can_be_compared(two_runs, tmp_path):
    main(["report", str(two_runs[0])])
    only = tmp_path / "only"
    only.mkdir()
    (only / "report.json").write_text((two_runs[0] / "report.json").read_text())
    runs = load_runs([only, two_runs[1]])
    assert runs[0]["report"]["models"]["compressed"]["tasks"]["piqa"]["metrics"]["acc_norm"] == pytest.approx(0.627)
    assert json.loads((only / "report.json").read_text())["config"]["select"]["method"] == "zipcal"


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert main(["report", str(tmp_path), str(tmp_path), "--output", str(tmp_path / "x.pdf")]) == 2
    assert "expected a .md or .html" in capsys.readouterr().err


def test_a_run_not_yet_evaluated_reports_compression_and_calibration(tmp_path, capsys):
    run = write_run(tmp_path / "run", tokenizer_dir(tmp_path / "tok"))
    (run / "evaluate" / "results.json").unlink()
    assert main(["report", str(run)]) == 0
    assert "No evaluation results in this run" in capsys.readouterr().out
    html = (run / "report.html").read_text()
    assert "No evaluation results in this run" in html and "Per-layer sparsity" not in html  # alt text only
    assert 'alt="per-layer sparsity and relative reconstruction error"' in html


def test_a_cus_prun_error_gets_its_own_row_and_unit(two_runs, tmp_path):
    """Cus-Prun's rel_error is a pruned share of neuron impact, not ‖ΔWX‖²/‖WX‖²: it is never put in
    the SparseGPT runs' row."""
    import shutil

    cus = tmp_path / "cus"
    shutil.copytree(two_runs[0], cus)
    mods = [{"layer": i, "module": "mlp", "sparsity": 0.25, "rel_error": 0.1 * (i + 1), "seconds": 0.1}
            for i in range(2)]
    (cus / "compress" / "compression.json").write_text(json.dumps({"algorithm": "cus_prun", "modules": mods}))
    header, rows = comparison_table(load_runs([two_runs[0], cus]))
    by_name = {r[0]: r for r in rows}
    assert by_name["compression: mean relative reconstruction error"][2:] == ["‖ΔWX‖²/‖WX‖²", "–", "0.0200", "–"]
    assert by_name["compression: mean pruned share of neuron impact"][2:] == ["Σ pruned / Σ all impacts", "–", "–",
                                                                              "0.1500"]
