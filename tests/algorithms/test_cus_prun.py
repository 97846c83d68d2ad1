"""algorithms.cus_prun: known answers for neuron impact, relevance, counts and the FFN shrink."""
import pytest
import torch

from raycompress.algorithms.cus_prun import kept_count, neuron_impact, relevance, select_neurons, shrink_ffn


def _mlp(d_model=8, d_ff=12, seed=0):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(seed)
    return LlamaMLP(LlamaConfig(hidden_size=d_model, intermediate_size=d_ff, num_attention_heads=2, num_key_value_heads=2)).eval()


@torch.no_grad()
def test_impact_equals_brute_force_ablation():
    """E[a_i²]·||W_down[:, i]||² is the mean squared output change of removing neuron i."""
    mlp = _mlp()
    x = torch.randn(50, 8)
    a = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)  # (tokens, d_ff): the down projection's input
    impact = neuron_impact((a * a).mean(0), mlp.down_proj.weight)
    base = mlp(x)
    for i in range(12):
        gate = mlp.gate_proj.weight.clone()
        mlp.gate_proj.weight[i] = 0  # SiLU(0) = 0 removes the neuron exactly
        brute = ((mlp(x) - base) ** 2).sum(-1).mean()
        mlp.gate_proj.weight.copy_(gate)
        assert float(impact[i]) == pytest.approx(float(brute), rel=1e-4)


def test_relevance_is_max_of_mean_normalised_dimensions():
    rel = relevance({"lang": torch.tensor([1.0, 2.0, 3.0]), "domain": torch.tensor([30.0, 20.0, 10.0])})
    torch.testing.assert_close(rel, torch.tensor([1.5, 1.0, 1.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="at least one"):
        relevance({})
    with pytest.raises(ValueError, match="FFN width"):
        relevance({"a": torch.ones(3), "b": torch.ones(4)})


def test_a_neuron_relevant_to_one_dimension_only_is_kept():
    lang = torch.tensor([5.0, 1.0, 1.0, 1.0, 0.1, 1.0])
    task = torch.tensor([1.0, 1.0, 1.0, 1.0, 9.0, 0.1])
    keep = select_neurons(relevance({"language": lang, "task": task}), 2)
    assert keep.tolist() == [0, 4]


def test_kept_count_and_tie_order():
    assert kept_count(1536, 0.5, 8) == 768
    assert kept_count(100, 0.33, 8) == 72  # 67 rounded up to a multiple of 8
    assert kept_count(10, 0.99, 1) == 1 and kept_count(10, 0.0, 64) == 10
    assert select_neurons(torch.tensor([1.0, 2.0, 2.0, 1.0]), 3).tolist() == [0, 1, 2]


@torch.no_grad()
def test_shrunk_ffn_equals_ablated_ffn_and_padding_adds_nothing():
    mlp = _mlp()
    x = torch.randn(20, 8)
    keep = torch.tensor([0, 3, 4, 9])
    up = {n: {"weight": getattr(mlp, n).weight.clone()} for n in ("gate_proj", "up_proj")}
    for width in (None, 6):
        new_up, new_down = shrink_ffn(up, {"weight": mlp.down_proj.weight.clone()}, keep, width)
        small = _mlp(d_ff=width or 4)
        small.gate_proj.weight.copy_(new_up["gate_proj"]["weight"])
        small.up_proj.weight.copy_(new_up["up_proj"]["weight"])
        small.down_proj.weight.copy_(new_down["weight"])
        ablated = _mlp()
        ablated.load_state_dict(mlp.state_dict())
        drop = [i for i in range(12) if i not in keep.tolist()]
        ablated.gate_proj.weight[drop] = 0
        torch.testing.assert_close(small(x), ablated(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="smaller than"):
        shrink_ffn(up, {"weight": mlp.down_proj.weight}, keep, 3)


def test_bias_rows_follow_the_neurons():
    up = {"fc1": {"weight": torch.arange(12.0).reshape(4, 3), "bias": torch.arange(4.0)}}
    down = {"weight": torch.arange(8.0).reshape(2, 4), "bias": torch.ones(2)}
    new_up, new_down = shrink_ffn(up, down, torch.tensor([1, 3]))
    assert new_up["fc1"]["bias"].tolist() == [1.0, 3.0]
    assert new_up["fc1"]["weight"].tolist() == [[3.0, 4.0, 5.0], [9.0, 10.0, 11.0]]
    assert new_down["weight"].tolist() == [[1.0, 3.0], [5.0, 7.0]] and new_down["bias"].tolist() == [1.0, 1.0]


def _solve(acts: dict[str, torch.Tensor], w_down: torch.Tensor, sparsity: float):
    """The registered Cus-Prun layer solve on sqnorm statistics of explicit down inputs `acts`
    (dimension -> (tokens, d_ff)); returns (rel_error, pruned neuron indices)."""
    import raycompress.engine.solvers  # noqa: F401  (registers the algorithms)
    from raycompress.config import CompressConfig
    from raycompress.engine.stats import InputStats
    from raycompress.registry import ALGORITHMS

    d_model, d_ff = w_down.shape
    stats = {}
    for dim, a in acts.items():
        stats[dim] = InputStats("sqnorm", d_ff)
        stats[dim].add_batch(a)
    cfg = CompressConfig(algorithm="cus_prun", sparsity=sparsity,
                         cus_prun={"dimensions": {d: [d] for d in acts}, "multiple_of": 1})
    up = {"up_proj": {"weight": torch.randn(d_ff, d_model, generator=torch.Generator().manual_seed(9))}}
    out, info = ALGORITHMS.get("cus_prun").layer_solve(up, "down_proj", {"weight": w_down}, stats, cfg, None)
    kept = {next(i for i in range(d_ff) if torch.equal(c, w_down[:, i])) for c in out["down_proj"]["weight"].T}
    return info["rel_error"], [i for i in range(d_ff) if i not in kept]


@torch.no_grad()
def test_rel_error_is_the_pruned_share_of_neuron_impact_not_the_output_error():
    """Known answer from explicit inputs X (tokens, d_ff) and W_down (d_model, d_ff): rel_error =
    mean over dimensions of Σ_pruned ‖X[:, i] W_down[:, i]ᵀ‖² / Σ_i ‖X[:, i] W_down[:, i]ᵀ‖²
    (each neuron removed alone); it is not ‖X ΔWᵀ‖² / ‖X Wᵀ‖² unless the neurons' activations
    are uncorrelated."""
    g = torch.Generator().manual_seed(0)
    w_down = torch.randn(5, 8, generator=g, dtype=torch.float64)
    mix = torch.eye(8, dtype=torch.float64) + 0.8 * torch.randn(8, 8, generator=g, dtype=torch.float64)
    acts = {"lang": torch.randn(40, 8, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, 8),
            "domain": torch.randn(30, 8, generator=g, dtype=torch.float64) @ mix}  # correlated neurons
    rel, pruned = _solve(acts, w_down, 0.5)
    assert len(pruned) == 4

    def alone(x, i):  # ‖Δh‖² summed over tokens when neuron i alone is removed
        return float((x[:, i:i + 1] * w_down[:, i]).pow(2).sum())

    shares = [sum(alone(x, i) for i in pruned) / sum(alone(x, i) for i in range(8)) for x in acts.values()]
    assert rel == pytest.approx(sum(shares) / len(shares), rel=1e-6)  # float32 statistics
    dw = torch.zeros_like(w_down)
    dw[:, pruned] = w_down[:, pruned]
    output = [float((x @ dw.T).pow(2).sum() / (x @ w_down.T).pow(2).sum()) for x in acts.values()]
    assert abs(sum(output) / 2 - rel) > 0.01  # the cross terms matter here

    # one neuron active per token: H = XᵀX is diagonal and the two quantities coincide
    x = torch.zeros(16, 8, dtype=torch.float64)
    x[torch.arange(16), torch.arange(16) % 8] = torch.linspace(0.5, 3.0, 16, dtype=torch.float64)
    rel, pruned = _solve({"only": x}, w_down, 0.5)
    dw = torch.zeros_like(w_down)
    dw[:, pruned] = w_down[:, pruned]
    assert rel == pytest.approx(float((x @ dw.T).pow(2).sum() / (x @ w_down.T).pow(2).sum()), rel=1e-6)
