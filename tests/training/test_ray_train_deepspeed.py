"""distributed.train_workers, strategy deepspeed: 2 CPU Ray Train workers (gloo) run ZeRO-2 and
ZeRO-3 on DeepSpeed's CPU accelerator, hold the mask, report checkpoints with DeepSpeed's optimizer
partitions, publish the model like the DDP branch, and resume from the step-2 checkpoint. ZeRO-3's
final gather is a collective every rank must enter: a run where one rank skips it hangs, and here
fails (collective timeout, then the test's own limit) instead."""
from pathlib import Path

import pytest
import torch
from trainfixtures import load_weights, pruned_dir, run_trainer  # noqa: F401  (fixture)

pytest.importorskip("deepspeed")

TRAIN = {"steps": 3, "checkpoint_every": 2, "lr": 1e-2, "weight_decay": 0.0, "strategy": "deepspeed"}


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_keeps_mask_reports_and_resumes(ray_local, pruned_dir, tmp_path, stage):
    pruned, masks = pruned_dir
    result, final = run_trainer(pruned, tmp_path, "ds", zero_stage=stage, **TRAIN)
    assert result.error is None, result.error
    reported = {m["step"]: (c, m) for c, m in result.best_checkpoints}
    assert sorted(reported) == [2, 3]
    total = sum(m.numel() for m in masks.values())
    assert all(m["sparsity"] == 0.5 and m["masked"] == total // 2 for _, m in reported.values())
    files = sorted(p.name for p in Path(reported[2][0].path).iterdir())
    assert files == ["ds", "masks.safetensors", "model", "state.json"]  # training.checkpoint's layout

    trained, start = load_weights(final), load_weights(pruned)
    assert (final / "manifest.sha256.json").is_file()
    for n, m in masks.items():
        w = trained[f"{n}.weight"]
        assert w.dtype == torch.float32
        assert (w[m] == 0).all() and int((w == 0).sum()) == int(m.sum()), n
        assert not torch.equal(w, start[f"{n}.weight"]), f"{n} did not train"

    # resume at step 2 from the checkpoint (model, masks and DeepSpeed's optimizer partitions)
    resumed, final2 = run_trainer(pruned, tmp_path, "ds_resumed", resume_from=reported[2][0].path,
                                  zero_stage=stage, **TRAIN)
    assert resumed.error is None, resumed.error
    assert sorted(m["step"] for _, m in resumed.best_checkpoints) == [3]
    again = load_weights(final2)
    for n, m in masks.items():
        assert (again[f"{n}.weight"][m] == 0).all(), n
    worst = max(float((trained[k].float() - again[k].float()).abs().max()) for k in trained)
    assert worst < 1e-5, worst  # same data order and optimizer state: the same step 3
