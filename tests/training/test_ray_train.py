"""training.ray_train: a 2-worker CPU TorchTrainer (gloo DDP) keeps the mask, reports checkpoints,
and resuming from the step-2 checkpoint ends with the same weights as the uninterrupted run."""
import pytest
import torch
from trainfixtures import pruned_dir  # noqa: F401  (fixture)


STEPS, EVERY = 4, 2


def _run(ray_local, pruned, tmp_path, name, resume_from=None):
    from raycompress.training.ray_train import make_trainer, packed_dataset

    rows = torch.randint(0, 256, (16, 16), generator=torch.Generator().manual_seed(0))  # 16 rows of 16 tokens
    cfg = {"model_dir": str(pruned), "output_dir": str(tmp_path / f"{name}_final"), "steps": STEPS,
           "batch_size": 2, "lr": 1e-2, "weight_decay": 0.01, "checkpoint_every": EVERY, "seed": 0,
           "resume_from": resume_from}
    trainer = make_trainer(cfg, packed_dataset(rows), num_workers=2, storage_path=str(tmp_path / "runs"),
                           name=name, cpus_per_worker=0.5)
    return trainer.fit(), tmp_path / f"{name}_final"


def _weights(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype="auto").state_dict()


def test_ray_train_keeps_mask_reports_and_resumes(ray_local, pruned_dir, tmp_path):
    pruned, masks = pruned_dir
    result, final = _run(ray_local, pruned, tmp_path, "full")
    assert result.error is None
    reported = {m["step"]: (c, m) for c, m in result.best_checkpoints}
    assert sorted(reported) == [2, 4]
    total = sum(m.numel() for m in masks.values())
    assert all(m["sparsity"] == 0.5 and m["masked"] == total // 2 for _, m in reported.values())

    trained, start = _weights(final), _weights(pruned)
    assert all(trained[k].dtype == torch.float32 for k in trained)
    assert (final / "model.safetensors").is_file()
    for n, m in masks.items():
        w = trained[f"{n}.weight"]
        assert (w[m] == 0).all() and int((w == 0).sum()) == int(m.sum()), n  # held, and exactly as sparse
        assert not torch.equal(w, start[f"{n}.weight"]), f"{n} did not train"

    # resume from the step-2 checkpoint: DDP on gloo with a fixed row order and one thread per worker
    # is deterministic, so steps 3-4 land on the uninterrupted run's weights bit for bit
    resumed, final2 = _run(ray_local, pruned, tmp_path, "resumed", resume_from=reported[2][0].path)
    assert resumed.error is None
    assert sorted(m["step"] for _, m in resumed.best_checkpoints) == [4]
    again = _weights(final2)
    mismatched = [k for k in trained if not torch.equal(trained[k], again[k])]
    assert not mismatched, mismatched[:5]
