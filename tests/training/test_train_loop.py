"""training.loop: the GMP loop reaches exactly the final sparsity, masks only grow, budget checked."""
import pytest
import torch

from raycompress.algorithms.gmp import expected_pruned
from raycompress.training.loop import GMPSchedule, check_budget, train_loop
from raycompress.training.masks import WeightMask


def _model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_gmp_loop_reaches_exact_final_sparsity(tiny_llama_dir, scope):
    torch.manual_seed(0)
    model = _model(tiny_llama_dir)
    mask = WeightMask.from_zeros(model)  # dense: nothing masked
    assert mask.counts()[0] == 0
    mask.attach()
    gmp = GMPSchedule(s_i=0.0, s_f=0.6, t0=1, n=3, dt=2, scope=scope)  # prunes at 1, 3, 5, 7
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    seen = []

    def on_step(step, loss):
        seen.append((step, mask.counts()[0]))
        for n, w in mask.weights().items():
            assert (w[mask.masks[n]] == 0).all()

    batches = iter(torch.randint(0, 256, (9, 2, 16)))
    losses = train_loop(model, batches, opt, mask, steps=9, gmp=gmp, on_step=on_step)
    assert len(losses) == 9
    counts = [c for _, c in seen]
    assert counts == sorted(counts) and counts[2] == 0 and counts[3] > 0  # s = s_i = 0 at t0 = 1
    numels = [w.numel() for w in mask.weights().values()]
    assert mask.counts()[0] == mask.zeros()[0] == expected_pruned(numels, 0.6, scope)
    if scope == "layer":
        for n, w in mask.weights().items():
            assert int((w == 0).sum()) == int(w.numel() * 0.6), n


def test_budget_errors():
    with pytest.raises(ValueError, match="outside the training budget"):
        check_budget(GMPSchedule(0.0, 0.5, t0=5, n=2, dt=3), steps=11)  # ends at 11
    check_budget(GMPSchedule(0.0, 0.5, t0=5, n=2, dt=3), steps=12)
    with pytest.raises(ValueError):
        check_budget(None, steps=0)
    with pytest.raises(ValueError):
        check_budget(GMPSchedule(0.0, 1.0), steps=10)


def test_loop_fails_clearly_when_batches_run_out(tiny_llama_dir):
    model = _model(tiny_llama_dir)
    mask = WeightMask.from_zeros(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="ran out at step 1"):
        train_loop(model, iter(torch.randint(0, 256, (1, 2, 8))), opt, mask, steps=3)
