"""distributed.train through the orchestrator: the tiny job's compressed checkpoint trained with its
mask held by 2 CPU Ray Train workers, published like compress, evaluated and reported as
`recovered`; a changed train section refuses the old folder; a quantized compress is refused."""
import json
import shutil

import pytest
import torch
import yaml

from raycompress.distributed.orchestrator import ORDER, run_job
from raycompress.storage import uri

TRAIN = {"steps": 3, "seq_len": 16, "batch_size": 2, "num_workers": 2, "cpus_per_worker": 0.5,
         "checkpoint_every": 2, "lr": 1e-2, "sources": ["bio"]}


def _job(tiny_job_dir, tmp_path, compress=None, **train):
    from raycompress.config import load_config

    raw = yaml.safe_load((tiny_job_dir / "job.yaml").read_text())
    raw["train"] = {**TRAIN, **train}
    raw["compress"] = compress or raw["compress"]
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


def _target_weights(folder):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({k: v for k, v in load_file(f).items() if ".layers." in k and k.endswith("proj.weight")})
    return out


@pytest.fixture(scope="module")
def trained(tiny_job_dir, tiny_job_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    out = tmp / "out"
    shutil.copytree(tiny_job_run, out)
    job = _job(tiny_job_dir, tmp)
    state = run_job(job, out, ORDER, tiny_job_dir / "model", force_stages=("train",))
    return job, out, state


def test_train_holds_the_mask_and_publishes_like_compress(trained):
    _, out, state = trained
    assert state.stages["train"]["steps"] == 3
    summary = json.loads((out / "train" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["tokens"] == 3 * 2 * 2 * 16
    assert summary["sparsity"] == summary["sparsity_start"] > 0.4  # sparsegpt 50% of the target linears

    before, after = _target_weights(out / "compress" / "model"), _target_weights(out / "train" / "model")
    assert before.keys() == after.keys() and before
    for name, w in before.items():
        assert after[name].dtype == w.dtype, name  # the checkpoint's dtype is kept
        assert torch.equal(after[name] == 0, w == 0), name  # every pruned weight still 0, no new zeros
    assert any(not torch.equal(after[n], before[n]) for n in before), "nothing trained"

    manifest = json.loads((out / "train" / "model" / "manifest.sha256.json").read_text())
    for name, digest in manifest["files"].items():
        assert uri.sha256(out / "train" / "model" / name)[0] == digest, name


def test_recovered_model_is_evaluated_and_reported(trained):
    _, out, _ = trained
    results = json.loads((out / "evaluate" / "results.json").read_text())
    assert {"dense", "compressed", "recovered"} <= set(results)
    assert results["recovered"]["tasks"]["ppl"]["metrics"]["word_perplexity"] > 0
    md = (out / "report.md").read_text()
    assert "recovered" in md and "## Recovery (train)" in md
    assert "trained with its mask fixed, ddp on 2 workers, 3 steps, 192 tokens" in md
    assert "Recovery (train)" in (out / "report.html").read_text()


def test_checkpoints_are_found_for_resume(trained):
    from raycompress.distributed.train import latest_checkpoint

    _, out, _ = trained
    latest = latest_checkpoint(str(out / "train" / "runs"))
    assert latest is not None and json.loads(open(f"{latest}/state.json").read())["step"] == 3


def test_a_changed_train_section_refuses_the_folder(trained, tiny_job_dir, tmp_path):
    from raycompress.distributed.guard import StageMismatch

    _, out, _ = trained
    with pytest.raises(StageMismatch, match=r"train\.steps: 3 in the folder, 4 in this job"):
        run_job(_job(tiny_job_dir, tmp_path, steps=4), out, ORDER, tiny_job_dir / "model")


def test_training_a_quantized_checkpoint_is_refused_before_ray(tiny_job_dir, tmp_path):
    from raycompress.distributed.plan import PreflightError

    job = _job(tiny_job_dir, tmp_path, compress={"algorithm": "gptq", "quant": {"bits": 4, "group_size": 32}})
    with pytest.raises(PreflightError, match="quantized checkpoint"):
        run_job(job, tmp_path / "q", ORDER, tiny_job_dir / "model")
