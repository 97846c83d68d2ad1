"""training.ray_train with train.strategy deepspeed: 2 CPU Ray Train workers (gloo) run ZeRO-2 on
DeepSpeed's CPU accelerator, hold the mask, report checkpoints with DeepSpeed's optimizer
partitions, publish the model like the DDP branch, and resume from the step-2 checkpoint."""
import pytest
import torch
from trainfixtures import pruned_dir  # noqa: F401  (fixture)

pytest.importorskip("deepspeed")

STEPS, EVERY = 3, 2


def _run(pruned, tmp_path, name, resume_from=None):
    from raycompress.training.ray_train import make_trainer, packed_dataset

    rows = torch.randint(0, 256, (16, 16), generator=torch.Generator().manual_seed(0))
    cfg = {"model_dir": str(pruned), "output_dir": str(tmp_path / f"{name}_final"), "steps": STEPS,
           "batch_size": 2, "lr": 1e-2, "weight_decay": 0.0, "checkpoint_every": EVERY, "seed": 0,
           "resume_from": resume_from, "strategy": "deepspeed", "zero_stage": 2}
    trainer = make_trainer(cfg, packed_dataset(rows), num_workers=2, storage_path=str(tmp_path / "runs"),
                           name=name, cpus_per_worker=0.5)
    return trainer.fit(), tmp_path / f"{name}_final"


def _weights(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype="auto", trust_remote_code=False).state_dict()


def test_deepspeed_zero2_keeps_mask_reports_and_resumes(ray_local, pruned_dir, tmp_path):
    pruned, masks = pruned_dir
    result, final = _run(pruned, tmp_path, "ds")
    assert result.error is None, result.error
    reported = {m["step"]: (c, m) for c, m in result.best_checkpoints}
    assert sorted(reported) == [2, 3]
    total = sum(m.numel() for m in masks.values())
    assert all(m["sparsity"] == 0.5 and m["masked"] == total // 2 for _, m in reported.values())

    trained, start = _weights(final), _weights(pruned)
    assert (final / "manifest.sha256.json").is_file()
    for n, m in masks.items():
        w = trained[f"{n}.weight"]
        assert w.dtype == torch.float32
        assert (w[m] == 0).all() and int((w == 0).sum()) == int(m.sum()), n
        assert not torch.equal(w, start[f"{n}.weight"]), f"{n} did not train"

    # resume at step 2 from the checkpoint (model, masks and DeepSpeed's optimizer partitions)
    resumed, final2 = _run(pruned, tmp_path, "ds_resumed", resume_from=reported[2][0].path)
    assert resumed.error is None, resumed.error
    assert sorted(m["step"] for _, m in resumed.best_checkpoints) == [3]
    again = _weights(final2)
    for n, m in masks.items():
        assert (again[f"{n}.weight"][m] == 0).all(), n
    worst = max(float((trained[k].float() - again[k].float()).abs().max()) for k in trained)
    assert worst < 1e-5, worst  # same data order and optimizer state: the same step 3
