"""training.loop: the GMP loop reaches exactly the final sparsity, masks only grow, budget checked
(by the schema's one rule, `GMPScheduleConfig.check_within`)."""
import pytest
import torch

from raycompress.algorithms.gmp import expected_pruned
from raycompress.config import GMPScheduleConfig
from raycompress.training.loop import gmp_update, resolve_gmp, train_loop, train_step
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
    gmp = GMPScheduleConfig(initial_sparsity=0.0, final_sparsity=0.6, start_step=1, n_prunes=3, interval=2,
                            scope=scope)  # prunes at 1, 3, 5, 7
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    seen = []

    def on_step(step, loss):
        seen.append((step, mask.counts()[0]))
        for n, w in mask.weights().items():
            assert (w[mask.masks[n]] == 0).all()

    batches = iter(torch.randint(0, 256, (9, 2, 16)))
    losses = train_loop(lambda b: train_step(model, b, opt, mask), batches, mask, steps=9, gmp=gmp, on_step=on_step)
    assert len(losses) == 9
    counts = [c for _, c in seen]
    assert counts == sorted(counts) and counts[2] == 0 and counts[3] > 0  # s = s_i = 0 at t0 = 1
    numels = [w.numel() for w in mask.weights().values()]
    assert mask.counts()[0] == mask.zeros()[0] == expected_pruned(numels, 0.6, scope)
    if scope == "layer":
        for n, w in mask.weights().items():
            assert int((w == 0).sum()) == int(w.numel() * 0.6), n


def test_budget_is_the_schemas_rule(tiny_llama_dir):
    late = GMPScheduleConfig(initial_sparsity=0.0, final_sparsity=0.5, start_step=5, n_prunes=2, interval=3)
    assert late.end == 11
    with pytest.raises(ValueError, match="outside train.steps = 11"):
        late.check_within(11)
    late.check_within(12)
    model = _model(tiny_llama_dir)
    mask = WeightMask.from_zeros(model)
    ran = []
    with pytest.raises(ValueError, match="outside train.steps"):  # refused before any step runs
        train_loop(ran.append, iter(torch.randint(0, 256, (11, 2, 8))), mask, steps=11, gmp=late)
    assert ran == []


def test_unresolved_schedule_takes_the_runs_start_sparsity(tiny_llama_dir):
    mask = WeightMask.from_zeros(_model(tiny_llama_dir))
    gmp = GMPScheduleConfig(final_sparsity=0.5, n_prunes=2, interval=1)
    with pytest.raises(ValueError, match="resolve_gmp"):
        gmp_update(mask, 0, gmp)
    assert resolve_gmp(gmp, 0.25).initial_sparsity == 0.25
    assert resolve_gmp(gmp.model_copy(update={"initial_sparsity": 0.1}), 0.25).initial_sparsity == 0.1
    assert resolve_gmp(None, 0.25) is None


def test_loop_fails_clearly_when_batches_run_out(tiny_llama_dir):
    model = _model(tiny_llama_dir)
    mask = WeightMask.from_zeros(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="ran out at step 1"):
        train_loop(lambda b: train_step(model, b, opt, mask), iter(torch.randint(0, 256, (1, 2, 8))), mask, steps=3)
