"""training.session without Ray: one save / report / metrics path for every strategy; every rank
makes the same collective calls in the same order (ZeRO-3's gather is one), fresh or resumed at
the end; DDP on one process trains, reports and publishes with no Ray at all."""
import ast
import json
import shutil
import typing
from pathlib import Path

import pytest
import torch
from trainfixtures import pruned_dir  # noqa: F401  (fixture)

from raycompress.config import TrainConfig
from raycompress.training.checkpoint import load_start
from raycompress.training.masks import target_linears
from raycompress.training.session import Session, run_session, start_session
from raycompress.training.strategies import STRATEGIES


class Recorder:
    """A strategy that records the calls every rank must make together; rank 0 alone gets the state
    dict (as at ZeRO-3)."""

    def __init__(self, model, rank, calls):
        self.model, self.rank, self.calls = model, rank, calls

    def step(self, batch):
        self.calls.append("step")
        return 2.5

    def save(self, folder):
        self.calls.append("save")
        (folder / f"part{self.rank}").write_text("x")

    def state_dict(self):
        self.calls.append("gather")
        return self.model.state_dict() if self.rank == 0 else None


def _run_rank(model_dir, out, rank, start, steps=3, every=2):
    model, mask, _, s0 = load_start(str(model_dir), None)
    calls, reports = [], []
    cfg = TrainConfig(steps=steps, checkpoint_every=every)
    s = Session(cfg, Recorder(model, rank, calls), mask, start, s0, None, rank)
    batches = lambda skip: iter(torch.randint(0, 256, (steps, 2, 8)))  # noqa: E731
    run_session(s, batches, lambda m, folder: reports.append((m, sorted(p.name for p in folder.iterdir()))),
                str(model_dir), str(out))
    return calls, reports


@pytest.mark.parametrize("start", [0, 3])  # fresh; resumed at the end (no step runs)
def test_every_rank_makes_the_same_collective_calls(pruned_dir, tmp_path, start):
    pruned, masks = pruned_dir
    calls0, reports0 = _run_rank(pruned, tmp_path / "out0", 0, start)
    calls1, reports1 = _run_rank(pruned, tmp_path / "out1", 1, start)
    assert calls0 == calls1  # a rank gathering alone would wait for ever at ZeRO-3
    assert calls0.count("gather") == (2 if start == 0 else 1)  # checkpoints at 2 and 3; or the final gather
    assert (tmp_path / "out0" / "manifest.sha256.json").is_file() and not (tmp_path / "out1").exists()
    total = sum(m.numel() for m in masks.values())
    assert [m["step"] for m, _ in reports0] == ([2, 3] if start == 0 else [])
    for m, files in reports0:
        assert m["sparsity"] == m["sparsity_start"] == 0.5 and m["masked"] == total // 2 and m["loss"] == 2.5
        assert files == ["masks.safetensors", "model", "part0", "state.json"]
    assert [files for _, files in reports1] == [["part1"]] * len(reports0)  # rank 1: its own part only


def test_strategies_are_the_schemas():
    assert set(STRATEGIES) == set(typing.get_args(TrainConfig.model_fields["strategy"].annotation))


def test_ddp_runs_without_ray_and_resumes(pruned_dir, tmp_path):
    pruned, masks = pruned_dir
    cfg = TrainConfig(steps=2, checkpoint_every=1, lr=1e-2, batch_size=2, seq_len=8)
    data = torch.randint(0, 256, (2, 2, 8), generator=torch.Generator().manual_seed(0))
    kept = []

    def keep(metrics, folder):
        dst = tmp_path / f"ckpt{metrics['step']}"
        shutil.copytree(folder, dst)
        kept.append((metrics, dst))

    s = start_session(cfg, str(pruned), None, torch.device("cpu"), 0)
    run_session(s, lambda skip: iter(data[skip:]), keep, str(pruned), str(tmp_path / "out"))
    assert [m["step"] for m, _ in kept] == [1, 2]
    assert json.loads((kept[0][1] / "state.json").read_text()) == {"step": 1, "sparsity_start": 0.5}
    out, _, _, _ = load_start(str(tmp_path / "out"), None)
    for n, lin in target_linears(out).items():
        assert (lin.weight[masks[n]] == 0).all() and int((lin.weight == 0).sum()) == int(masks[n].sum()), n

    s2 = start_session(cfg, str(pruned), kept[0][1], torch.device("cpu"), 0)  # resume at step 1
    assert s2.start == 1 and s2.sparsity_start == 0.5
    run_session(s2, lambda skip: iter(data[skip:]), lambda m, f: None, str(pruned), str(tmp_path / "out2"))
    again = load_start(str(tmp_path / "out2"), None)[0].state_dict()
    assert all(torch.equal(v, again[k]) for k, v in out.state_dict().items())  # the same step 2


def test_training_is_ray_free():
    import raycompress.training as pkg

    found = []
    for path in sorted(Path(pkg.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name}: {n}" for n in names if n == "ray" or n.startswith("ray.")]
    assert not found, found  # the Ray Train shell lives in distributed/train_workers.py
