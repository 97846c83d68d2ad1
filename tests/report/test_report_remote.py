"""Reports of run folders in a bucket: the same report.md as from the same folders on disk, written
back into the bucket; the job's model in the bucket decodes the calibration concepts."""
from __future__ import annotations

import json

import pytest
from reportfixtures import tokenizer_dir, upload, write_run

from raycompress.report.compare import report_runs
from raycompress.report.report import write_report
from raycompress.storage import uri


@pytest.fixture(scope="module")
def runs(tmp_path_factory, s3_server):
    """Two finished runs, on disk and uploaded to the bucket under the same folder names."""
    root = tmp_path_factory.mktemp("remote_runs")
    tok = tokenizer_dir(root / "tok")
    local = [write_run(root / "zipcal", tok, method="zipcal", loss=0.05),
             write_run(root / "random", tok, method="random", loss=0.2)]
    remote = [upload(d, s3_server(f"runs/{d.name}")) for d in local]
    return local, remote


def test_one_run_in_a_bucket_reports_as_on_disk(runs):
    (local, *_), (remote, *_) = runs
    assert write_report(None, str(local)) == write_report(None, remote) == ["report.json", "report.md", "report.html"]
    md = uri.read_text(uri.join(remote, "report.md"))
    assert md == (local / "report.md").read_text() and "| piqa |" in md
    on_disk, in_bucket = (json.loads(uri.read_text(uri.join(d, "report.json"))) for d in (str(local), remote))
    assert in_bucket["run_dir"] == uri.display(remote) and "endpoint_override" not in json.dumps(in_bucket)
    assert in_bucket["calibration"] == on_disk["calibration"] and in_bucket["calibration"]["top_concepts"]["items"]
    assert "data:image/png;base64," in uri.read_text(uri.join(remote, "report.html"))


def test_report_runs_on_bucket_folders_gives_the_same_markdown(runs, s3_server, tmp_path):
    local, remote = runs
    assert report_runs([remote[0]]) == report_runs([str(local[0])])
    out = s3_server(f"compare/{tmp_path.name}.md")
    md = report_runs(remote, out)
    expected = report_runs([str(d) for d in local])
    for d, r in zip(local, remote):
        expected = expected.replace(str(d), uri.display(r))
    assert md == expected and "| demo (method=zipcal) | demo (method=random) |" in md
    assert uri.read_text(out) == md and "endpoint_override" not in md
    single = s3_server(f"compare/{tmp_path.name}-single.html")
    report_runs([remote[1]], single)
    assert uri.read_text(single) == uri.read_text(uri.join(remote[1], "report.html"))


def test_the_jobs_model_in_a_bucket_decodes_concepts_through_the_cache(runs, s3_server, tmp_path):
    (local, *_), _ = runs
    model = upload(tokenizer_dir(tmp_path / "tok"), s3_server(f"models/{tmp_path.name}"))
    run = upload(local, s3_server(f"runs/{tmp_path.name}"))
    config = json.loads((local / "job.json").read_text())
    cache = tmp_path / "cache"
    uri.write_text(uri.join(run, "job.json"), json.dumps({**config, "model": model,
                                                          "storage": {"cache_dir": str(cache)}}))
    write_report(None, run)
    write_report(None, str(local))
    concepts = json.loads(uri.read_text(uri.join(run, "report.json")))["calibration"]["top_concepts"]
    expected = json.loads((local / "report.json").read_text())["calibration"]["top_concepts"]
    assert concepts["items"] and concepts["items"] == expected["items"]
    assert concepts["tokenizer"] == uri.display(uri.join(model, "tokenizer.json"))
    assert any((cache / "views").iterdir())  # tokenizer.json came through the node cache


def test_a_bucket_folder_that_is_not_a_run_names_it_without_the_query(s3_server, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"s3://raycompress-test/empty/.*: none of .* not a run folder") as exc:
        report_runs([s3_server(f"empty/{tmp_path.name}")])
    assert "endpoint_override" not in str(exc.value)
