"""Fixtures and helpers shared by the training tests (imported by name: a second conftest.py would
shadow the root one for `from conftest import`)."""
import threading

import pytest
import torch

from raycompress.training.masks import target_linears

FIT_LIMIT_S = 600  # a Ray Train run of these tests takes 1-3 min on 2 loaded CPUs; past this it hangs
COLLECTIVE_TIMEOUT_S = 240  # a rank left alone in a collective fails the run after this long


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory, tiny_llama_dir):
    """The 2-layer hidden-64 tiny Llama, its target linears magnitude-pruned to 50% (exact zeros)."""
    from transformers import AutoModelForCausalLM

    from raycompress.algorithms.gmp import magnitude_masks

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    lins = target_linears(model)
    masks = magnitude_masks({n: lin.weight for n, lin in lins.items()}, 0.5, "layer")
    with torch.no_grad():
        for n, lin in lins.items():
            lin.weight.masked_fill_(masks[n], 0)
    out = tmp_path_factory.mktemp("pruned")
    model.save_pretrained(out)
    return out, {n: m.clone() for n, m in masks.items()}


def fit_bounded(trainer, limit_s: float = FIT_LIMIT_S):
    """trainer.fit() in a daemon thread; fails the test (instead of hanging it) past `limit_s` seconds."""
    box: dict = {}

    def fit():
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001  (re-raised in the test's thread)
            box["error"] = e

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    thread.join(limit_s)
    if thread.is_alive():
        pytest.fail(f"the Ray Train run did not finish in {limit_s} s (a rank waiting in a collective?)")
    if "error" in box:
        raise box["error"]
    return box["result"]


def run_trainer(pruned, tmp_path, name, resume_from=None, **train):
    """A 2-worker CPU Ray Train run (0.5 CPU each) of `pruned` on 16 random rows of 16 tokens with
    `train` (TrainConfig fields); returns (Result, the published model's folder)."""
    import ray.data

    from raycompress.config import TrainConfig
    from raycompress.distributed.train_workers import TrainRun, make_trainer

    rows = torch.randint(0, 256, (16, 16), generator=torch.Generator().manual_seed(0))
    dataset = ray.data.from_items([{"input_ids": r} for r in rows.numpy()])
    cfg = TrainConfig(**{"batch_size": 2, "seq_len": 16, "num_workers": 2, "cpus_per_worker": 0.5, "seed": 0,
                         **train})
    run = TrainRun(cfg, str(pruned), output_dir=str(tmp_path / f"{name}_final"), resume_from=resume_from)
    trainer = make_trainer(run, dataset, str(tmp_path / "runs"), name, timeout_s=COLLECTIVE_TIMEOUT_S)
    return fit_bounded(trainer), tmp_path / f"{name}_final"


def load_weights(folder):
    """The state dict of the model saved in `folder`, in its own dtype."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype="auto", trust_remote_code=False).state_dict()
