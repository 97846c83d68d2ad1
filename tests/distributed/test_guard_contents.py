"""distributed.guard: a rerun never reuses a stage whose inputs changed by content (weights edited
between any sampled windows, a task's template or data, a corpus file cut short), and an output
folder is ours or empty (a foreign folder, `/` and the home folder are refused untouched)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from raycompress.config import JobConfig
from raycompress.distributed.guard import (MARKER, ForeignOutput, StageMismatch, check_stages, claim_output,
                                           input_contents, stage_inputs)
from raycompress.models.fetch import ModelRef
from raycompress.storage import uri

CORPUS = Path(__file__).resolve().parents[2] / "data" / "corpora" / "biomed_pubmedqa_pool.jsonl"


@pytest.fixture
def job_files(tiny_llama_dir, tmp_path):
    """A job whose model, corpus and task (YAML + data) are private copies that a test may edit."""
    shutil.copytree(tiny_llama_dir, tmp_path / "model")
    (tmp_path / "corpus.jsonl").write_text(CORPUS.read_text())
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "items.jsonl").write_text("".join(json.dumps({"q": f"q{i}", "a": "yes", "b": "no", "label": i % 2}) + "\n"
                                               for i in range(4)))
    (tasks / "yn.yaml").write_text("name: yn\nkind: multiple_choice\npath: items.jsonl\nprompt: 'Q: {{q}}'\n"
                                   "choices: ['{{a}}', '{{b}}']\ntarget: '{{label}}'\n")
    job = JobConfig.model_validate({
        "model": str(tmp_path / "model"), "base_dir": str(tmp_path), "storage": {"cache_dir": str(tmp_path / "cache")},
        "select": {"sources": {"a": {"path": str(tmp_path / "corpus.jsonl")}}},
        "compress": {"algorithm": "sparsegpt", "sparsity": 0.5},
        "evaluate": {"task_dirs": [str(tasks)], "tasks": ["yn"]}})
    return job, ModelRef(str(tmp_path / "model"), str(tmp_path / "cache"))


def _finished(job, model) -> tuple[dict, dict]:
    inputs = stage_inputs(job, input_contents(job, model))
    return {name: {"wall_s": 1.0, "inputs": rec} for name, rec in inputs.items()}, inputs


def test_unchanged_inputs_reuse_every_stage_without_reading_the_weights_again(job_files, monkeypatch):
    job, model = job_files
    stages, _ = _finished(job, model)
    import raycompress.storage.cache as cache

    monkeypatch.setattr(cache.uri, "sha256", lambda *a, **k: pytest.fail(f"re-read {a[0]}"))
    check_stages(stages, stage_inputs(job, input_contents(job, model)), "out", set())  # stat only


def test_weights_edited_between_any_windows_refuse_select(job_files):
    """Bytes sign-flipped in the middle of the tensor data, file size unchanged (issue 20, case 1)."""
    job, model = job_files
    stages, _ = _finished(job, model)
    weights = sorted(Path(model.location).glob("*.safetensors"))[-1]
    data = bytearray(weights.read_bytes())
    mid = len(data) // 2 + 4097
    data[mid:mid + 4096] = bytes(b ^ 0x80 for b in data[mid:mid + 4096])
    weights.write_bytes(bytes(data))
    with pytest.raises(StageMismatch, match=rf"stage select .*\n  model.{weights.name}: content sha256 \w{{12}} in the "
                                            r"folder, content sha256 \w{12} in this job"):
        check_stages(stages, stage_inputs(job, input_contents(job, model)), "out", set())


@pytest.mark.parametrize("edit", ["template", "data"])
def test_a_task_edited_after_a_run_refuses_evaluate_only(job_files, edit):
    """Issue 20, case 2: the old scores are not kept; selection and compression still are."""
    job, model = job_files
    stages, _ = _finished(job, model)
    tasks = Path(job.evaluate.task_dirs[0])
    if edit == "template":
        (tasks / "yn.yaml").write_text((tasks / "yn.yaml").read_text().replace("Q: ", "Question: "))
    else:
        (tasks / "items.jsonl").write_text((tasks / "items.jsonl").read_text().replace('"yes"', '"yep"'))
    now = stage_inputs(job, input_contents(job, model))
    check_stages({k: v for k, v in stages.items() if k != "evaluate"}, now, "out", set())
    with pytest.raises(StageMismatch, match=r"stage evaluate .*\n  tasks.yn: content sha256"):
        check_stages(stages, now, "out", set())


def test_a_corpus_cut_short_after_a_run_refuses_select(job_files):
    """Issue 20, case 3: 1,248 lines cut to 300."""
    job, model = job_files
    stages, _ = _finished(job, model)
    corpus = Path(job.select.sources["a"].path)
    corpus.write_text("".join(corpus.read_text().splitlines(keepends=True)[:300]))
    with pytest.raises(StageMismatch, match=r"stage select .*\n  corpora.a.corpus.jsonl: content sha256"):
        check_stages(stages, stage_inputs(job, input_contents(job, model)), "out", set())


def test_run_job_refuses_a_rerun_on_edited_weights_before_ray(tiny_job_run, tmp_path):
    """The orchestrator's own path: a finished run, the same job on a copy of its model with 4 KiB
    flipped mid-file, is refused naming the weight file (no stage reused, nothing started)."""
    import ray

    from raycompress.config import load_config
    from raycompress.distributed.orchestrator import ORDER, run_job

    out, model = tmp_path / "out", tmp_path / "model"
    shutil.copytree(tiny_job_run, out)
    shutil.copytree(tiny_job_run.parent / "model", model)
    weights = sorted(model.glob("*.safetensors"))[-1]
    data = bytearray(weights.read_bytes())
    data[len(data) // 2:len(data) // 2 + 4096] = bytes(b ^ 0x80 for b in data[len(data) // 2:len(data) // 2 + 4096])
    weights.write_bytes(bytes(data))
    before = (out / "state.json").read_bytes()
    job = load_config(tiny_job_run.parent / "job.yaml").model_copy(update={"model": str(model)})
    was_up = ray.is_initialized()
    with pytest.raises(StageMismatch, match=rf"stage select .*\n  model.{weights.name}: content sha256"):
        run_job(job, out, ORDER, model)
    assert (out / "state.json").read_bytes() == before and ray.is_initialized() == was_up


def test_an_unrelated_folder_is_refused_untouched(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "state.json").write_text('["not", "raycompress"]')
    (tmp_path / ".lock").write_text("someone else's lock")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ForeignOutput, match=r"is not empty \(3 entries.*not made by raycompress"):
        claim_output(str(tmp_path))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("where,why", [("/", "the filesystem root"), ("~", "the user's home folder")])
def test_root_and_home_are_refused(where, why):
    with pytest.raises(ForeignOutput, match=why):
        claim_output(str(Path(where).expanduser()))


def test_a_new_or_empty_folder_is_claimed_then_reused(tmp_path):
    out = tmp_path / "new" / "run"
    claim_output(str(out))
    assert json.loads((out / MARKER).read_text())["made_by"] == "raycompress"
    (out / "select").mkdir()
    claim_output(str(out))  # ours: reused


def test_a_run_folder_from_before_the_marker_is_adopted(tmp_path):
    (tmp_path / "job.json").write_text("{}")
    (tmp_path / "state.json").write_text(json.dumps({"stages": {"select": {"wall_s": 1.0}}}))
    claim_output(str(tmp_path))
    assert (tmp_path / MARKER).is_file()


def test_object_storage_folders_follow_the_same_rule(s3_server):
    uri.write_text(s3_server("theirs/data.csv"), "x")
    with pytest.raises(ForeignOutput, match="not made by raycompress"):
        claim_output(s3_server("theirs"))
    assert uri.listdir(s3_server("theirs")) == ["data.csv"]
    claim_output(s3_server("ours/run"))
    assert uri.is_file(uri.join(s3_server("ours/run"), MARKER))
    with pytest.raises(ForeignOutput, match="a bucket's root"):
        claim_output(s3_server(""))
