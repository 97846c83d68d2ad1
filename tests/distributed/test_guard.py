"""distributed.guard and plan.preflight: one run per output folder, no stage reused by another
job, and what a job names checked before Ray starts (each error names the field)."""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from raycompress.config import JobConfig
from raycompress.distributed import guard
from raycompress.distributed.guard import OutputBusy, OutputLock, StageMismatch, check_stages, stage_inputs
from raycompress.distributed.plan import PreflightError, preflight
from raycompress.models.fetch import ModelRef


def test_second_run_on_a_folder_is_refused_naming_the_holder(tmp_path):
    with OutputLock(str(tmp_path), settle_s=0):
        with pytest.raises(OutputBusy, match=rf"in use by another run \(host {socket.gethostname()}, pid \d+"):
            with OutputLock(str(tmp_path), settle_s=0):
                pass
    assert not (tmp_path / ".lock").exists()  # released
    with OutputLock(str(tmp_path), settle_s=0):  # and free again
        pass


@pytest.mark.parametrize("holder,busy", [
    ({"host": socket.gethostname(), "pid": 2**22 + 17, "heartbeat": "now"}, False),  # a dead process here
    ({"host": "other-node", "pid": 1, "heartbeat": "old"}, False),                  # a silent driver elsewhere
    ({"host": "other-node", "pid": 1, "heartbeat": "now"}, True),                   # a live driver elsewhere
])
def test_a_killed_runs_lock_expires(tmp_path, holder, busy):
    beat = time.time() if holder["heartbeat"] == "now" else time.time() - guard.STALE_S - 1
    (tmp_path / ".lock").write_text(json.dumps({**holder, "token": "x", "started": beat, "heartbeat": beat}))
    if busy:
        with pytest.raises(OutputBusy, match="other-node"):
            OutputLock(str(tmp_path), settle_s=0).__enter__()
    else:
        with OutputLock(str(tmp_path), settle_s=0):
            assert json.loads((tmp_path / ".lock").read_text())["token"] != "x"


CORPUS = Path(__file__).resolve().parents[2] / "data" / "corpora" / "biomed_pubmedqa_pool.jsonl"


def _job(tiny_llama_dir, **compress) -> JobConfig:
    return JobConfig.model_validate({
        "model": str(tiny_llama_dir), "base_dir": ".", "select": {"sources": {"a": {"path": str(CORPUS)}}, "seq_len": 64},
        "compress": {"algorithm": "sparsegpt", "sparsity": 0.5, **compress}, "evaluate": {"tasks": []}})


A, B = "a" * 64, "b" * 64


def test_a_changed_job_does_not_reuse_finished_stages(tiny_llama_dir):
    contents = {"model": {"model.safetensors": A}, "corpora": {}, "tasks": {}}
    old = stage_inputs(_job(tiny_llama_dir), contents)
    new = stage_inputs(_job(tiny_llama_dir, sparsity=0.6), contents)
    stages = {name: {"wall_s": 1.0, "inputs": rec} for name, rec in old.items()}
    check_stages(stages, old, "out", set())  # the same job reuses everything
    with pytest.raises(StageMismatch, match=r"stage compress in out was made by a different job:\n  "
                                            r"compress.sparsity: 0.5 in the folder, 0.6 in this job"):
        check_stages(stages, new, "out", set())
    check_stages(stages, new, "out", {"compress", "evaluate", "report"})  # --force-stage compress
    changed = {**contents, "model": {"model.safetensors": B}}
    with pytest.raises(StageMismatch, match=r"stage select .*\n  model.model.safetensors: content sha256 aaaaaaaaaaaa "
                                            r"in the folder, content sha256 bbbbbbbbbbbb in this job"):
        check_stages(stages, stage_inputs(_job(tiny_llama_dir), changed), "out", set())


@pytest.mark.parametrize("changes,field", [
    ({"select": {"sources": {"a": {"path": "/nonexistent/*.jsonl"}}}}, r"select.sources.a.path: no file matches /nonexistent/\*.jsonl"),
    ({"compress": {"algorithm": "sparsegtp"}}, r"compress.algorithm: unknown compression algorithm 'sparsegtp'"),
    ({"select": {"method": "zipcall"}}, r"select.method: unknown selection method 'zipcall'"),
    ({"compress": {"targets": ["mlp.nope"]}}, r"compress.targets: \['mlp.nope'\]"),
    ({"compress": {"sparsity": [0.5, 0.5, 0.5]}}, r"compress.sparsity: 3 values for the model's 2 decoder layers"),
    ({"compress": {"algorithm": "gptq", "quant": {"bits": 4, "group_size": 48}, "block_size": 96}},
     r"compress.quant.group_size: group size 48 does not divide d_in=64 of module self_attn.q_proj"),
    ({"evaluate": {"tasks": ["no_such_task"]}}, r"evaluate.tasks: evaluate.tasks\[0\]: no task or group named 'no_such_task'"),
    ({"evaluate": {"tasks": [{"name": "p", "kind": "perplexity", "path": "missing.jsonl"}]}},
     r"evaluate.tasks: task 'p': field 'path': .*missing.jsonl not found"),
])
def test_preflight_names_the_field_before_ray_starts(tiny_llama_dir, changes, field):
    import ray

    raw = _job(tiny_llama_dir).model_dump(mode="json")
    for section, values in changes.items():
        raw[section] = {**raw[section], **values}
    was_up = ray.is_initialized()
    with pytest.raises(PreflightError, match=field):
        preflight(JobConfig.model_validate(raw), ModelRef(str(tiny_llama_dir)))
    assert ray.is_initialized() == was_up


def test_preflight_renders_task_templates_in_the_sandbox(tiny_llama_dir, tmp_path):
    """A template that reaches for os.system is refused before Ray starts; the command never runs."""
    marker = tmp_path / "ran"
    data = tmp_path / "items.jsonl"
    data.write_text(json.dumps({"q": "x", "a": "y", "b": "n", "label": 0}) + "\n")
    raw = _job(tiny_llama_dir).model_dump(mode="json")
    raw["evaluate"] = {**raw["evaluate"], "tasks": [{
        "name": "evil", "kind": "multiple_choice", "path": str(data), "choices": ["{{a}}", "{{b}}"], "target": "{{label}}",
        "prompt": "{{ cycler.__init__.__globals__.os.system('touch %s') }}" % marker}]}
    with pytest.raises(PreflightError, match=r"evaluate.tasks: task 'evil': item 0 of .*items.jsonl: field 'prompt'"):
        preflight(JobConfig.model_validate(raw), ModelRef(str(tiny_llama_dir)))
    assert not marker.exists()
