"""Properties of the N:M and group-size arithmetic (algorithms.masks, algorithms.quant) on random
shapes and values: every group of M consecutive inputs keeps exactly N, the group count of a
quantized weight is d_in / group_size, dequantized values are within half a step of the input,
and a size that does not divide d_in is refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from raycompress.algorithms.magnitude import magnitude_prune
from raycompress.algorithms.masks import nm_mask
from raycompress.algorithms.quant import QuantSpec, qparams, quantize_int, rtn

SETTINGS = settings(max_examples=50, deadline=None)


@st.composite
def _nm_problem(draw):
    """(score (d_out, groups·M) float32 with ties and zeros allowed, N, M)."""
    m = draw(st.integers(2, 8))
    n = draw(st.integers(1, m - 1))
    d_out, groups = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    values = st.floats(-100, 100, width=32) | st.sampled_from([0.0, 1.0, -1.0])  # repeated values: ties
    score = draw(arrays(np.float32, (d_out, groups * m), elements=values))
    return torch.from_numpy(score), n, m


@SETTINGS
@given(_nm_problem())
def test_nm_mask_prunes_exactly_m_minus_n_lowest_of_every_group(problem):
    score, n, m = problem
    mask = nm_mask(score, n, m)
    assert mask.shape == score.shape and mask.dtype == torch.bool
    groups, pruned = score.reshape(score.shape[0], -1, m), mask.reshape(score.shape[0], -1, m)
    assert torch.all(pruned.sum(-1) == m - n)  # True = pruned: M - N pruned, N kept in every group
    lowest_kept = groups.masked_fill(pruned, float("inf")).amin(-1)
    highest_pruned = groups.masked_fill(~pruned, float("-inf")).amax(-1)
    assert torch.all(highest_pruned <= lowest_kept)  # the kept ones score highest (ties either way)


@SETTINGS
@given(_nm_problem())
def test_magnitude_nm_zeroes_exactly_the_masked_weights(problem):
    w, n, m = problem
    pruned, mask = magnitude_prune(w, 0.0, (n, m))
    assert torch.all(mask.reshape(w.shape[0], -1, m).sum(-1) == m - n)
    assert torch.all(pruned[mask] == 0) and torch.equal(pruned[~mask], w[~mask])


@SETTINGS
@given(st.integers(2, 8), st.integers(1, 4), st.integers(1, 24), st.integers(0, 9))
def test_nm_mask_refuses_widths_not_divisible_and_bad_n(m, d_out, d_in, n):
    score = torch.zeros(d_out, d_in)
    if not 0 < n < m:
        with pytest.raises(ValueError, match="0 < N < M"):
            nm_mask(score, n, m)
    elif d_in % m:
        with pytest.raises(ValueError, match="not divisible"):
            nm_mask(score, n, m)
    else:
        assert nm_mask(score, n, m).sum() == d_out * (d_in // m) * (m - n)


@st.composite
def _quant_problem(draw):
    """(w (d_out, n_groups·g) float32, QuantSpec with group size g or None)."""
    g = draw(st.sampled_from([1, 2, 3, 4, 8, 16]))
    d_out, n_groups = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    magnitude = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    values = st.floats(-1, 1, width=32) | st.just(0.0)
    w = torch.from_numpy(draw(arrays(np.float32, (d_out, n_groups * g), elements=values))) * magnitude
    spec = QuantSpec(bits=draw(st.sampled_from([4, 8])), symmetric=draw(st.booleans()),
                     group_size=draw(st.sampled_from([g, None])))
    return w, spec


@SETTINGS
@given(_quant_problem())
def test_group_quantization_has_d_in_over_g_groups_within_half_a_step(problem):
    w, spec = problem
    d_out, d_in = w.shape
    g = spec.group_size or d_in
    deq, scale, zero = rtn(w, spec)
    assert scale.shape == zero.shape == (d_out, d_in // g) and deq.shape == w.shape
    step = scale.repeat_interleave(g, 1)  # (d_out, d_in): each column's own group's scale
    # half a step, plus float32 rounding of w / scale (the symmetric grid's top value sits exactly half a step
    # below max|w|, e.g. 7.5 steps rounded to 8 and clamped to 7)
    assert torch.all((deq - w).abs() <= step / 2 + 4 * torch.finfo(torch.float32).eps * w.abs() + 1e-30)
    codes = torch.cat([quantize_int(w[:, c:c + g], scale[:, c // g], zero[:, c // g], spec)
                       for c in range(0, d_in, g)], 1)
    assert torch.all(codes >= spec.qmin) and torch.all(codes <= spec.qmax) and torch.equal(codes, codes.round())
    for c in range(0, d_in, g):  # each group's parameters are its own columns' (not a neighbour's)
        s, z = qparams(w[:, c:c + g], spec)
        assert torch.equal(scale[:, c // g], s) and torch.equal(zero[:, c // g], z)


@SETTINGS
@given(st.integers(2, 16), st.integers(1, 40))
def test_group_size_not_dividing_d_in_is_refused(g, d_in):
    w = torch.ones(2, d_in)
    if d_in % g:
        with pytest.raises(ValueError, match="does not divide"):
            rtn(w, QuantSpec(4, True, g))
    else:
        assert rtn(w, QuantSpec(4, True, g))[1].shape == (2, d_in // g)
