"""distributed.train_workers, strategy ddp: a 2-worker CPU TorchTrainer (gloo DDP) keeps the mask,
reports checkpoints, and resuming from the step-2 checkpoint ends with the same weights as the
uninterrupted run."""
from pathlib import Path

import torch
from trainfixtures import load_weights, pruned_dir, run_trainer  # noqa: F401  (fixture)

TRAIN = {"steps": 4, "checkpoint_every": 2, "lr": 1e-2, "weight_decay": 0.01}


def test_ray_train_keeps_mask_reports_and_resumes(ray_local, pruned_dir, tmp_path):
    pruned, masks = pruned_dir
    result, final = run_trainer(pruned, tmp_path, "full", **TRAIN)
    assert result.error is None
    reported = {m["step"]: (c, m) for c, m in result.best_checkpoints}
    assert sorted(reported) == [2, 4]
    total = sum(m.numel() for m in masks.values())
    assert all(m["sparsity"] == 0.5 and m["masked"] == total // 2 for _, m in reported.values())
    files = sorted(p.name for p in Path(reported[2][0].path).iterdir())
    assert files == ["masks.safetensors", "model", "optimizer.pt", "state.json"]  # training.checkpoint's layout

    trained, start = load_weights(final), load_weights(pruned)
    assert all(trained[k].dtype == torch.float32 for k in trained)
    assert (final / "model.safetensors").is_file()
    for n, m in masks.items():
        w = trained[f"{n}.weight"]
        assert (w[m] == 0).all() and int((w == 0).sum()) == int(m.sum()), n  # held, and exactly as sparse
        assert not torch.equal(w, start[f"{n}.weight"]), f"{n} did not train"

    # resume from the step-2 checkpoint: DDP on gloo with a fixed row order and one thread per worker
    # is deterministic, so steps 3-4 land on the uninterrupted run's weights bit for bit
    resumed, final2 = run_trainer(pruned, tmp_path, "resumed", resume_from=reported[2][0].path, **TRAIN)
    assert resumed.error is None
    assert sorted(m["step"] for _, m in resumed.best_checkpoints) == [4]
    again = load_weights(final2)
    mismatched = [k for k in trained if not torch.equal(trained[k], again[k])]
    assert not mismatched, mismatched[:5]
