"""End to end under a local Ray (num_cpus=2): select -> compress -> evaluate -> report on a tiny
random Llama with a tokenizer trained on the fly; checks every artefact a user relies on."""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration


def test_whole_job(tiny_job_dir, tiny_job_run):
    from transformers import AutoModelForCausalLM

    out = tiny_job_run

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


def test_rerun_skips_finished_stages(tiny_job_dir, tiny_job_run, caplog):
    import logging

    from raycompress.config import load_config
    from raycompress.distributed.orchestrator import ORDER, run_job

    out = tiny_job_run
    before = (out / "compress" / "model" / "manifest.sha256.json").read_text()
    recorded = json.loads((out / "state.json").read_text())["stages"]
    with caplog.at_level(logging.INFO, logger="raycompress.distributed.orchestrator"):
        state = run_job(load_config(tiny_job_dir / "job.yaml"), out, ORDER, tiny_job_dir / "model")
    for stage in ("select", "compress", "evaluate"):  # read back from state.json, not rerun
        assert state.stages[stage] == recorded[stage]
        assert f"stage {stage} already finished" in caplog.text
    assert (out / "compress" / "model" / "manifest.sha256.json").read_text() == before
