"""The eval pool under a local Ray: 1 and 2 actors give the same numbers, a killed actor is
replaced without changing them, a model in a bucket scores as the same model on disk, and the
results file has the shape the report reads."""
from __future__ import annotations

import json
import random

import pytest

from conftest import random_doc

from raycompress.config import JobConfig
from raycompress.models.fetch import ModelRef
from raycompress.storage import uri


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaltasks")
    rng = random.Random(1)
    (root / "docs.jsonl").write_text("\n".join(json.dumps({"text": random_doc(rng, 50)}) for _ in range(6)) + "\n")
    rows = [{"q": random_doc(rng, 6), "a": random_doc(rng, 3), "b": random_doc(rng, 4), "y": i % 2} for i in range(12)]
    (root / "mc.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "tasks").mkdir()
    (root / "tasks" / "ppl.yaml").write_text(
        f"name: ppl\nkind: perplexity\npath: {root / 'docs.jsonl'}\ndomain: biomed\nmax_length: 48\n")
    for name in ("mc1", "mc2"):
        (root / "tasks" / f"{name}.yaml").write_text(
            f"name: {name}\nkind: multiple_choice\npath: {root / 'mc.jsonl'}\ngroup: mcg\n"
            "prompt: 'Q: {{q}}\\nA:'\nchoices: ['{{a}}', '{{b}}']\ntarget: '{{y}}'\n")
    return root


def _job(task_dir, actors: int, cache_dir=None, **evaluate) -> JobConfig:
    return JobConfig.model_validate({
        "model": "m", "select": {"sources": {"x": {"path": "unused"}}}, "compress": {},
        "evaluate": {"tasks": ["ppl", "mcg"], "task_dirs": [str(task_dir / "tasks")], "batch_tokens": 256,
                     "unit_tokens": 200, **evaluate},
        "ray": {"eval_actors": actors, "cpus_per_actor": 0.5, "torch_threads": 1}, "base_dir": str(task_dir),
        "storage": {"cache_dir": None if cache_dir is None else str(cache_dir)}})


def _numbers(res: dict) -> dict:
    return {label: {"tasks": {t: (r["metrics"], r["stderr"], r["n"]) for t, r in m["tasks"].items()},
                    "groups": m["groups"]} for label, m in res.items()}


@pytest.fixture(scope="module")
def one_actor(task_dir, tiny_lm_dir, ray_local):
    from raycompress.distributed.evaluate import evaluate_models

    local = ModelRef(str(tiny_lm_dir))
    return evaluate_models(_job(task_dir, 1), {"dense": local, "again": local})


def test_results_shape(one_actor):
    dense = one_actor["dense"]
    assert dense["seconds"] > 0 and dense["restarts"] == 0
    ppl = dense["tasks"]["ppl"]
    assert ppl["kind"] == "perplexity" and ppl["domain"] == "biomed" and ppl["n"] == 6
    assert ppl["primary"] == "word_perplexity" and ppl["metrics"]["token_perplexity"] > 1
    mc = dense["tasks"]["mc1"]
    assert mc["group"] == "mcg" and mc["n"] == 12 and set(mc["metrics"]) == {"acc", "acc_norm"}
    assert set(mc["stderr"]) == {"acc", "acc_norm"} and mc["higher_is_better"] == {"acc": True, "acc_norm": True}
    assert dense["groups"]["mcg"]["members"] == ["mc1", "mc2"]
    assert set(dense["groups"]) == {"mcg", "domain:biomed", "domain:general"}
    assert _numbers({"x": one_actor["dense"]}) == _numbers({"x": one_actor["again"]})
    json.dumps(one_actor, allow_nan=False)


def test_two_actors_same_numbers(one_actor, task_dir, tiny_lm_dir, ray_local):
    from raycompress.distributed.evaluate import evaluate_models

    two = evaluate_models(_job(task_dir, 2), {"dense": ModelRef(str(tiny_lm_dir))})
    assert _numbers(two) == _numbers({"dense": one_actor["dense"]})


def test_killed_actor_same_numbers(one_actor, task_dir, tiny_lm_dir, tmp_path, ray_local, monkeypatch):
    from raycompress.distributed.evaluate import evaluate_models

    monkeypatch.setenv("RAYCOMPRESS_CHAOS_KILL_EVAL_UNIT", "1")
    monkeypatch.setenv("RAYCOMPRESS_CHAOS_MARKER", str(tmp_path / "killed"))
    res = evaluate_models(_job(task_dir, 2), {"dense": ModelRef(str(tiny_lm_dir))})
    assert (tmp_path / "killed").exists() and res["dense"]["restarts"] == 1
    assert _numbers(res) == _numbers({"dense": one_actor["dense"]})


def test_device_map_auto_on_cpu_same_numbers(one_actor, task_dir, tiny_lm_dir, ray_local):
    from raycompress.distributed.evaluate import evaluate_models

    res = evaluate_models(_job(task_dir, 1, device_map="auto"), {"dense": ModelRef(str(tiny_lm_dir))})
    assert _numbers(res) == _numbers({"dense": one_actor["dense"]})


def test_in_process_matches_pool(one_actor, task_dir, tiny_lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raycompress.evaluation.local import evaluate_in_process
    from raycompress.evaluation.taskfiles import resolve_tasks

    job = _job(task_dir, 1)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, trust_remote_code=False).eval()
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir, trust_remote_code=False)
    res = evaluate_in_process(model, tok, resolve_tasks(job), job.resolve, 256)
    for name, rec in one_actor["dense"]["tasks"].items():
        assert res["tasks"][name]["metrics"] == pytest.approx(rec["metrics"], rel=1e-5)


def test_a_plain_path_is_taken_as_a_model_ref(one_actor, task_dir, tiny_lm_dir, ray_local):
    from raycompress.distributed.evaluate import evaluate_models

    res = evaluate_models(_job(task_dir, 2), {"dense": tiny_lm_dir})
    assert _numbers(res) == _numbers({"dense": one_actor["dense"]})


@pytest.fixture(scope="module")
def remote_lm(tiny_lm_dir, s3_server):
    """The tiny model's folder uploaded to the bucket, file by file."""
    loc = s3_server("evaluate/tiny-lm")
    for p in sorted(tiny_lm_dir.iterdir()):
        if p.is_file():
            uri.copy(str(p), uri.join(loc, p.name))
    return loc


def test_model_in_a_bucket_scores_as_on_disk(one_actor, task_dir, remote_lm, tmp_path, ray_local):
    from raycompress.distributed.evaluate import evaluate_models

    cache = tmp_path / "cache"
    res = evaluate_models(_job(task_dir, 1, cache_dir=cache), {"dense": ModelRef(remote_lm, str(cache))})
    assert _numbers(res) == _numbers({"dense": one_actor["dense"]})
    (view,) = (cache / "views").iterdir()  # the actor's copy of the whole folder, through the node cache
    assert {p.name for p in view.iterdir()} == set(uri.listdir(remote_lm))


def test_a_model_without_config_fails_before_any_work_naming_label_and_location(task_dir, s3_server, tiny_lm_dir):
    from raycompress.distributed.evaluate import evaluate_models

    absent = s3_server("evaluate/absent")
    with pytest.raises(FileNotFoundError, match=r"model 'compressed': s3://raycompress-test/evaluate/absent has no "
                                                r"config.json") as exc:
        evaluate_models(_job(task_dir, 1), {"dense": ModelRef(str(tiny_lm_dir)), "compressed": ModelRef(absent)})
    assert "endpoint_override" not in str(exc.value)
