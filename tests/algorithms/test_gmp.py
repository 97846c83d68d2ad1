"""algorithms.gmp: the cubic schedule (Zhu & Gupta 2017, eq. 1) and global / per-layer magnitude masks."""
import pytest
import torch

from raycompress.algorithms.gmp import (
    expected_pruned,
    global_magnitude_masks,
    gmp_sparsity,
    is_pruning_step,
    layer_magnitude_masks,
    magnitude_masks,
    pruned_count,
)

SCHED = dict(s_i=0.0, s_f=0.5, t0=10, n=4, dt=5)  # pruning at steps 10, 15, 20, 25, 30


@pytest.mark.parametrize("step, expected", [
    (0, 0.0), (9, 0.0),  # before t0: s_i
    (10, 0.0),  # t0: s_i (1 - 0)^3 = 1
    (14, 0.0),  # held until the next pruning step
    (15, 0.5 - 0.5 * 0.75 ** 3),  # 0.2890625
    (20, 0.4375),  # mid: 0.5 - 0.5 * 0.5^3
    (24, 0.4375),
    (25, 0.5 - 0.5 * 0.25 ** 3),
    (30, 0.5), (31, 0.5), (1000, 0.5),  # end and after: s_f
])
def test_schedule_known_values(step, expected):
    assert gmp_sparsity(step, **SCHED) == pytest.approx(expected, abs=1e-12)


def test_schedule_from_one_shot_sparsity_and_monotone():
    values = [gmp_sparsity(t, s_i=0.3, s_f=0.7, t0=0, n=3, dt=2) for t in range(10)]
    assert values[0] == pytest.approx(0.3) and values[6] == pytest.approx(0.7)
    assert values[2] == pytest.approx(0.7 - 0.4 * (2 / 3) ** 3)
    assert all(a <= b for a, b in zip(values, values[1:]))


def test_pruning_steps():
    steps = [t for t in range(40) if is_pruning_step(t, SCHED["t0"], SCHED["n"], SCHED["dt"])]
    assert steps == [10, 15, 20, 25, 30]


@pytest.mark.parametrize("bad", [dict(s_i=-0.1), dict(s_f=1.0), dict(s_i=0.6, s_f=0.5), dict(n=0), dict(dt=0), dict(t0=-1)])
def test_schedule_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        gmp_sparsity(12, **{**SCHED, **bad})


def _tiny():
    a = torch.tensor([[1.0, -2.0], [3.0, -4.0]])  # small magnitudes
    b = torch.tensor([[10.0, 0.5, -20.0], [30.0, 40.0, -50.0]])  # large ones, and one 0.5
    return {"a": a, "b": b}


def test_global_vs_per_layer_masks_known_answer():
    w = _tiny()
    g = global_magnitude_masks(w, 0.5)  # floor(0.5 * 10) = 5 lowest of all: 0.5, 1, 2, 3, 4
    assert g["a"].tolist() == [[True, True], [True, True]]
    assert g["b"].tolist() == [[False, True, False], [False, False, False]]
    per = layer_magnitude_masks(w, 0.5)  # 2 of 4 in a, 3 of 6 in b
    assert per["a"].tolist() == [[True, True], [False, False]]
    assert per["b"].tolist() == [[True, True, True], [False, False, False]]  # 0.5, 10, 20
    assert pruned_count(g) == (5, 10) and pruned_count(per) == (5, 10)


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("s", [0.0, 0.1, 0.37, 0.5, 0.9])
def test_exact_counts(scope, s):
    torch.manual_seed(0)
    w = {"q": torch.randn(8, 16), "k": torch.randn(4, 16, dtype=torch.bfloat16), "o": torch.randn(16, 7)}
    m = magnitude_masks(w, s, scope)
    assert pruned_count(m)[0] == expected_pruned([t.numel() for t in w.values()], s, scope)
    if scope == "layer":
        for name, t in w.items():
            assert int(m[name].sum()) == int(t.numel() * s)
    for name in w:
        assert m[name].dtype == torch.bool and m[name].shape == w[name].shape


def test_prev_mask_stays_pruned_and_existing_zeros_first():
    w = {"a": torch.tensor([[0.0, 5.0, 6.0, 7.0]]), "b": torch.tensor([[1.0, 8.0]])}
    prev = {"a": torch.tensor([[False, True, False, False]])}  # a large entry already pruned
    m = magnitude_masks(w, 0.5, "global", prev)  # 3 of 6: the prev one, the zero, then 1.0
    assert m["a"].tolist() == [[True, True, False, False]] and m["b"].tolist() == [[True, False]]


def test_mask_errors():
    with pytest.raises(ValueError, match="2-D"):
        global_magnitude_masks({"x": torch.ones(3)}, 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        global_magnitude_masks({"x": torch.ones(2, 2)}, 1.0)
    with pytest.raises(ValueError, match="scope"):
        magnitude_masks({"x": torch.ones(2, 2)}, 0.5, "row")
    with pytest.raises(ValueError, match="shape"):
        layer_magnitude_masks({"x": torch.ones(2, 2)}, 0.5, prev={"x": torch.zeros(3, 2, dtype=torch.bool)})
    assert global_magnitude_masks({}, 0.5) == {}
