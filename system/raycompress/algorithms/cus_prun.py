"""Cus-Prun: structured pruning of FFN neurons irrelevant to every customisation dimension.

Source: Zhao et al., "Pruning General Large Language Models into Customized Expert Models"
(Cus-Prun, ACL Findings 2025, arXiv:2506.02561; code github.com/zhaoyiran924/Custom-Prune). A
neuron's impact on a corpus is the squared change of the layer output when it is removed,
||h_without_i(c) - h(c)||², averaged over the corpus. Each dimension (language, domain, task)
is scored on its own corpus; the expert keeps the neurons that are relevant to *any* dimension,
so the pruned neurons are those irrelevant to all of them. No post-training.

For FFN neuron i of a decoder layer (SwiGLU or plain MLP), the layer output carries the term
a_i(x) · W_down[:, i]; removing the neuron removes exactly that term, so per token
||Δh||² = a_i(x)² · ||W_down[:, i]||², and over a corpus E[a_i²] · ||W_down[:, i]||². E[a_i²] is
the down projection's per-input mean square, the statistic Wanda also uses. Pure tensor maths.

What a layer reports as `rel_error` (engine/solvers.py): per dimension, the pruned neurons' share
of the summed impacts, Σ_pruned E[a_i²]·‖W_down[:, i]‖² / Σ_i E[a_i²]·‖W_down[:, i]‖², averaged
over the dimensions. It is *not* the relative output error ‖ΔW_down X‖² / ‖W_down X‖² (X the
down projection's inputs, ΔW_down the pruned columns): with H = X Xᵀ that is
tr(ΔW H ΔWᵀ) / tr(W H Wᵀ), whose cross terms H_ij·W_down[:, i]ᵀW_down[:, j] (i ≠ j) need the
full (d_ff, d_ff) Hessian; the per-input squared norms collected here are only its diagonal. The
two agree when different neurons' activations are uncorrelated over the tokens (H diagonal).
"""
from __future__ import annotations

import math

import torch


def neuron_impact(act_sqmean: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """Mean squared change of the layer output when each FFN neuron is removed.

    Args:
        act_sqmean: (d_ff,) E[a_i²] over the corpus tokens, a = the down projection's input.
        w_down: (d_model, d_ff) down-projection weight.
    Returns:
        (d_ff,) float64 impact per neuron, E[a_i²] · ||W_down[:, i]||².
    """
    return act_sqmean.double() * w_down.double().pow(2).sum(0)


def relevance(impacts: dict[str, torch.Tensor]) -> torch.Tensor:
    """Relevance of each neuron across dimensions: max over dimensions of impact / mean impact.

    Each dimension's impacts are divided by their mean over the layer's neurons, so that corpora
    with larger activations do not dominate; the max keeps a neuron that matters to any one
    dimension (Cus-Prun prunes only neurons irrelevant to all dimensions).

    Args:
        impacts: dimension name -> (d_ff,) impacts from `neuron_impact`.
    Returns:
        (d_ff,) float64 relevance.
    Raises:
        ValueError: no dimensions, or dimensions of different widths.
    """
    if not impacts:
        raise ValueError("relevance needs at least one dimension")
    widths = {v.shape for v in impacts.values()}
    if len(widths) != 1:
        raise ValueError(f"dimensions disagree on the FFN width: {sorted(widths)}")
    normed = [v.double() / v.double().mean().clamp_min(1e-300) for _, v in sorted(impacts.items())]
    return torch.stack(normed).amax(0)


def kept_count(d_ff: int, sparsity: float, multiple_of: int = 1) -> int:
    """Neurons kept when removing `sparsity` of `d_ff`, rounded up to a multiple (at most d_ff, at least 1)."""
    keep = d_ff - int(round(sparsity * d_ff))
    keep = int(math.ceil(keep / multiple_of) * multiple_of)
    return max(1, min(d_ff, keep))


def select_neurons(rel: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (keep,) of the most relevant neurons in ascending order (ties: lower index first)."""
    order = sorted(range(rel.numel()), key=lambda i: (-float(rel[i]), i))
    return torch.tensor(sorted(order[:keep]), dtype=torch.long)


def shrink_ffn(up: dict[str, dict[str, torch.Tensor]], down: dict[str, torch.Tensor], keep: torch.Tensor,
               width: int | None = None) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Keep FFN neurons `keep`: rows of the up/gate projections, columns of the down projection.

    Args:
        up: module name -> {"weight": (d_ff, d_model), optional "bias": (d_ff,)} for each linear whose
            output rows are neurons (gate_proj and up_proj, or fc1).
        down: {"weight": (d_model, d_ff), optional "bias": (d_model,)} of the down projection.
        keep: (k,) neuron indices.
        width: pad to this many neurons with zero rows/columns (a zero neuron adds exactly nothing
            to the output); default k.
    Returns:
        (up, down) with d_ff replaced by `width`.
    Raises:
        ValueError: width < k.
    """
    k = keep.numel()
    width = k if width is None else width
    if width < k:
        raise ValueError(f"pad width {width} is smaller than the {k} kept neurons")

    def rows(t: torch.Tensor) -> torch.Tensor:  # (d_ff, ...) -> (width, ...)
        out = t.new_zeros((width,) + tuple(t.shape[1:]))
        out[:k] = t[keep]
        return out

    new_up = {name: {key: rows(t) for key, t in tensors.items()} for name, tensors in up.items()}
    w = down["weight"]  # (d_model, d_ff)
    w_new = w.new_zeros(w.shape[0], width)
    w_new[:, :k] = w[:, keep]
    return new_up, {**down, "weight": w_new}
