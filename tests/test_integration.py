"""End to end under a local Ray (num_cpus=2): select -> compress -> evaluate -> report on a tiny
random Llama with a tokenizer trained on the fly; checks every artefact a user relies on."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from conftest import make_tiny_llama, random_doc, write_tokenizer

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]

@pytest.fixture(scope="module")
def job_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("job")
    rng = random.Random(0)
    bio = [random_doc(rng, 60) for _ in range(40)]
    gen = [random_doc(rng, 60) for _ in range(40)]
    (root / "bio.jsonl").write_text("\n".join(json.dumps({"id": f"b{i}", "text": t}) for i, t in enumerate(bio))
                                    + "\n{not json\n" + json.dumps({"id": "e", "text": "   "}) + "\n")
    (root / "gen.jsonl").write_text("\n".join(json.dumps({"id": f"g{i}", "text": t}) for i, t in enumerate(gen)) + "\n")
    (root / "eval.jsonl").write_text("\n".join(json.dumps({"text": random_doc(rng, 80)}) for _ in range(6)) + "\n")
    (root / "piqa.jsonl").write_text("\n".join(json.dumps({"goal": random_doc(rng, 8), "sol1": random_doc(rng, 5), "sol2": random_doc(rng, 6),
                                                           "label": i % 2}) for i in range(6)) + "\n")
    model = root / "model"
    vocab = write_tokenizer(model, bio + gen)
    make_tiny_llama(model, layers=2, hidden=64, inter=128, vocab=vocab)
    job = {
        "name": "tiny", "model": str(model),
        "select": {"method": "zipcal", "sources": {"bio": {"path": str(root / "bio.jsonl")}, "gen": {"path": str(root / "gen.jsonl")}},
                   "mix": {"bio": 0.75, "gen": 0.25}, "n_samples": 8, "seq_len": 32, "seed": 0},
        "compress": {"algorithm": "sparsegpt", "sparsity": 0.5},
        "evaluate": {"batch_tokens": 512, "task_dirs": [str(REPO / "jobs" / "tasks")], "tasks": [
            {"name": "ppl", "kind": "perplexity", "path": str(root / "eval.jsonl"), "max_length": 32},
            {"name": "piqa", "path": str(root / "piqa.jsonl")}]},  # the shipped piqa task on this file
        "ray": {"compress_actors": 2, "eval_actors": 2, "cpus_per_actor": 0.5, "torch_threads": 1},
    }
    (root / "job.yaml").write_text(yaml.safe_dump(job))
    return root


@pytest.fixture(scope="module")
def finished(job_dir, ray_local):
    """The job run once into job_dir/out; each test below builds on it, in any order."""
    from raycompress.config import load_config
    from raycompress.distributed.orchestrator import ORDER, run_job

    out = job_dir / "out"
    run_job(load_config(job_dir / "job.yaml"), out, ORDER, job_dir / "model")
    return out


def test_whole_job(job_dir, finished):
    from transformers import AutoModelForCausalLM

    out = finished

    manifest = json.loads((out / "select" / "manifest.json").read_text())
    assert manifest["quotas"] == {"bio": 6, "gen": 2}
    assert manifest["skipped"]["bio"] == {"bio.jsonl": {"malformed_json": 1, "empty": 1}}
    assert len(manifest["selected"]) == 8 and len(manifest["fingerprint"]) == 64

    model = AutoModelForCausalLM.from_pretrained(out / "compress" / "model")
    for layer in model.model.layers:
        w = layer.mlp.down_proj.weight
        assert abs(float((w == 0).float().mean()) - 0.5) < 0.01
    comp = json.loads((out / "compress" / "compression.json").read_text())
    assert comp["actors"] == 2 and len(comp["modules"]) == 2 * 7

    results = json.loads((out / "evaluate" / "results.json").read_text())
    assert set(results) == {"dense", "compressed"}
    for label in ("dense", "compressed"):
        tasks = results[label]["tasks"]
        assert tasks["ppl"]["metrics"]["word_perplexity"] > 1 and tasks["ppl"]["n"] == 6
        assert tasks["piqa"]["n"] == 6 and set(tasks["piqa"]["stderr"]) == {"acc", "acc_norm"}
        assert set(results[label]["groups"]) == {"domain:general"}
    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]) == {"dense", "compressed"}
    assert set(report["stages"]) >= {"select", "compress", "evaluate"}
    assert "ppl" in (out / "report.md").read_text()


def test_rerun_skips_finished_stages(job_dir, finished, caplog):
    import logging

    from raycompress.config import load_config
    from raycompress.distributed.orchestrator import ORDER, run_job

    out = finished
    before = (out / "compress" / "model" / "manifest.sha256.json").read_text()
    recorded = json.loads((out / "state.json").read_text())["stages"]
    with caplog.at_level(logging.INFO, logger="raycompress.distributed.orchestrator"):
        state = run_job(load_config(job_dir / "job.yaml"), out, ORDER, job_dir / "model")
    for stage in ("select", "compress", "evaluate"):  # read back from state.json, not rerun
        assert state.stages[stage] == recorded[stage]
        assert f"stage {stage} already finished" in caplog.text
    assert (out / "compress" / "model" / "manifest.sha256.json").read_text() == before
