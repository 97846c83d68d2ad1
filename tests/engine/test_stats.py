"""engine.stats: Hessian / sqnorm accumulation and summing of partials."""
import pytest
import torch

from raycompress.engine.stats import InputStats


def test_hessian_two_batches_equals_concat():
    torch.manual_seed(0)
    a, b = torch.randn(2, 5, 6), torch.randn(7, 6)
    s = InputStats.empty("hessian", 6, torch.float64)
    s.add_batch(a)
    s.add_batch(b)
    a2 = a.reshape(-1, 6)
    # float32 products per batch, summed in float64 (what makes K workers agree bit for bit)
    assert torch.equal(s.value, (a2.T @ a2).double() + (b.T @ b).double())
    x = torch.cat([a2, b]).double()
    torch.testing.assert_close(s.value, x.T @ x, rtol=1e-5, atol=1e-5)
    assert s.tokens == 17
    assert s.value.shape == (6, 6)


def test_partials_sum_to_whole():
    """Partials reduced as the workers reduce them (`add_` into the receiver's buffer, in a fixed
    order) equal the statistics of all the batches in one accumulator."""
    torch.manual_seed(1)
    xs = [torch.randn(4, 3, 8) for _ in range(3)]
    for kind in ("hessian", "sqnorm"):
        whole = InputStats.empty(kind, 8, torch.float64)
        parts = []
        for x in xs:
            whole.add_batch(x)
            p = InputStats.empty(kind, 8, torch.float64)
            p.add_batch(x)
            parts.append(p)
        total = parts[0]
        for p in parts[1:]:
            total.add_(p)
        torch.testing.assert_close(total.value, whole.value)
        assert total.tokens == whole.tokens == 36
        assert total.kind == kind
        assert parts[1].tokens == 12  # the partials sent are not changed by the sum


def test_sqnorm_is_column_sum_of_squares():
    x = torch.tensor([[1.0, -2.0, 0.0], [3.0, 1.0, 0.5]])
    s = InputStats.empty("sqnorm", 3)
    s.add_batch(x)
    assert s.value.tolist() == [10.0, 5.0, 0.25]
    assert s.tokens == 2


def test_kind_mismatch_and_unknown_kind():
    with pytest.raises(ValueError, match="cannot add"):
        InputStats.empty("hessian", 2).add_(InputStats.empty("sqnorm", 2))
    with pytest.raises(ValueError, match="unknown statistics kind"):
        InputStats.empty("mean", 2)


def test_accumulator_dtype_casts_input_and_allocates_lazily():
    s = InputStats.empty("hessian", 2)
    assert s.value is None and s.nbytes == 0  # nothing allocated before the first micro-batch
    s.add_batch(torch.ones(3, 2, dtype=torch.bfloat16))
    assert s.value.dtype == torch.float32  # default accumulator (compress.hessian_dtype)
    assert s.value.tolist() == [[3.0, 3.0], [3.0, 3.0]] and s.nbytes == 16
    d = InputStats.empty("hessian", 2, torch.float64)
    d.add_batch(torch.ones(3, 2))
    assert d.value.dtype == torch.float64


def test_add_in_place_sums_tokens_and_output_norms():
    a, b = InputStats.empty("sqnorm", 2), InputStats.empty("sqnorm", 2)
    a.add_batch(torch.tensor([[1.0, 2.0]]))
    a.add_output("q", 5.0)
    b.add_batch(torch.tensor([[3.0, 0.0]]))
    b.add_output("q", 1.0)
    buf = a.value
    a.add_(b)
    assert a.value is buf and a.value.tolist() == [10.0, 4.0] and a.tokens == 2 and a.out_sq == {"q": 6.0}


def test_mix_stats_weights_per_token_means():
    from raycompress.engine.stats import mix_stats

    def st(v, n):
        return InputStats("sqnorm", 2, torch.float64, value=torch.tensor(v, dtype=torch.float64), tokens=n)

    out = mix_stats(st([4.0, 8.0], 4), st([2.0, 0.0], 2), 0.5)
    assert out.value.tolist() == [1.0 + 0.5, 2.0 + 0.0] and out.tokens == 1
    empty = InputStats.empty("sqnorm", 2)
    assert mix_stats(st([4.0, 8.0], 4), empty, 0.5).value.tolist() == [1.0, 2.0]


def test_abssum_and_absmax_known_answer():
    x = torch.tensor([[1.0, -2.0, 0.0], [-3.0, 0.5, 0.0]])
    s, m = InputStats.empty("abssum", 3), InputStats.empty("absmax", 3)
    s.add_batch(x)
    m.add_batch(x)
    assert s.value.tolist() == [4.0, 2.5, 0.0] and s.tokens == 2
    assert m.value.tolist() == [3.0, 2.0, 0.0] and m.tokens == 2


def test_absmax_reduces_with_max_in_any_order():
    """absmax partials reduce with max: any grouping and order gives the same bits."""
    torch.manual_seed(2)
    xs = [torch.randn(5, 8) * (i + 1) for i in range(4)]
    whole = InputStats.empty("absmax", 8)
    for x in xs:
        whole.add_batch(x)
    parts = []
    for x in xs:
        p = InputStats.empty("absmax", 8)
        p.add_batch(x)
        parts.append(p)
    left = parts[3].to("cpu")
    for p in (parts[1], parts[0], parts[2]):
        left.add_(p)
    assert torch.equal(left.value, whole.value)
    assert torch.equal(left.value, torch.cat(xs).abs().amax(0))
    assert left.tokens == 20


def test_absmax_keeps_nan_visible():
    m = InputStats.empty("absmax", 2)
    m.add_batch(torch.tensor([[float("nan"), 1.0]]))
    m.add_batch(torch.tensor([[2.0, 3.0]]))
    assert torch.isnan(m.value[0]) and m.value[1] == 3.0
