"""selection.routing and selection.router_probe: known-answer greedy picks on hand-made routing
tables, coverage and infeasibility reports, determinism, ZipCal's order at beta = 0, the two-round
method, and the probe on a tiny random Qwen3-MoE (against the model's own router logits)."""
import numpy as np
import pytest
import torch

from raycompress.registry import SELECTORS
from raycompress.selection import routing
from raycompress.selection.base import SelectContext, Window
from raycompress.selection.router_probe import RouterProbe, find_routers, load_probe
from raycompress.selection.zipcal import zipcal_greedy


def _same_concepts(n):
    return [np.array([1], dtype=np.int32) for _ in range(n)]


def _greedy(counts, k, m, beta=16.0, concepts=None, seed=0, pool=2000, prior=None):
    counts = np.asarray(counts, dtype=np.int64)
    concepts = _same_concepts(len(counts)) if concepts is None else concepts
    return routing.routing_greedy(concepts, counts, k, np.random.default_rng(seed), min_tokens_per_expert=m,
                                  beta=beta, pool=pool, prior=prior)


# one layer, three experts; every window has the same concepts, so only routing decides
TABLE = [[[5, 0, 0]], [[0, 5, 0]], [[3, 3, 0]], [[0, 0, 5]], [[1, 1, 1]]]


def test_route_counts_known_answer_and_errors():
    ids = np.array([[[[0, 2], [2, 1]], [[1, 1], [0, 0]]]])  # (1 window, 2 layers, 2 tokens, top-2)
    assert routing.route_counts(ids, 3).tolist() == [[[1, 1, 2], [2, 2, 0]]]
    with pytest.raises(ValueError, match="lie in"):
        routing.route_counts(ids, 2)
    with pytest.raises(ValueError, match="n, layers, tokens, top_k"):
        routing.route_counts(ids[0], 3)


def test_greedy_picks_the_windows_that_cover_the_experts():
    # step 1: need (3, 3, 3); [3, 3, 0] meets 6 of 9 -> window 2; step 2: need (0, 0, 3) -> window 3
    chosen, gains = _greedy(TABLE, 2, 3)
    assert chosen == [2, 3]
    assert gains == pytest.approx([1 + 16 * 6 / 9, 0 + 16 * 1.0])
    cov = routing.coverage_of(np.array(TABLE), chosen, 3)
    assert cov.tokens.tolist() == [[3, 3, 5]] and cov.summary()["starved_experts"] == 0
    # ZipCal's order (beta = 0, identical concepts): ties go to the earlier windows, expert 2 starves
    zip_chosen, _ = _greedy(TABLE, 2, 3, beta=0.0)
    assert zip_chosen == [0, 1]
    assert routing.coverage_of(np.array(TABLE), zip_chosen, 3).summary()["starved"] == [[0, 2]]


def test_lexical_term_breaks_routing_ties():
    counts = [[[2, 0]], [[2, 0]], [[0, 2]]]
    concepts = [np.array([1, 2]), np.array([3, 4, 5]), np.array([1])]
    # windows 0 and 1 route alike; window 1 adds 3 new concepts (the max: lexical 1) against 2
    assert _greedy(counts, 1, 2, concepts=concepts)[0] == [1]


def test_need_is_capped_and_prior_counts():
    # expert 0 already has 4 tokens from another source (prior): only expert 1 is needed
    counts = [[[9, 0]], [[0, 2]]]
    assert _greedy(counts, 1, 4, prior=np.array([[4, 0]]))[0] == [1]
    # without the prior, 9 tokens to expert 0 count only as its need of 4 (4 of 8 > 2 of 8)
    assert _greedy(counts, 1, 4)[0] == [0]


def test_unreached_expert_is_not_needed_and_short_pool_is_reported():
    counts = np.array([[[4, 1, 0]], [[4, 1, 0]], [[0, 0, 0]]])  # expert 2 never reached
    chosen, _ = _greedy(counts, 3, 3)
    s = routing.coverage_of(counts, chosen, 3, k=3).summary()
    assert s["experts_reached"] == 2 and s["starved"] == [[0, 1]]  # expert 1 gets 2 < 3 from the whole pool
    assert s["infeasible"] == {"pool_short": [[0, 1]], "budget_short": [], "budget_short_layers": []}
    assert s["feasible"] is False
    assert s["tokens_per_expert_min"] == 2


def test_infeasible_budget_is_reported():
    # each expert alone can get 5 tokens from one window, but one window cannot serve both
    counts = np.array([[[5, 0]], [[0, 5]]])
    chosen, _ = _greedy(counts, 1, 5)
    s = routing.coverage_of(counts, chosen, 5, k=1).summary()
    assert s["feasible"] is False and s["starved_experts"] == 1
    assert s["infeasible"] == {"pool_short": [], "budget_short": [], "budget_short_layers": [0]}
    assert routing.coverage_of(counts, [0, 1], 5, k=2).summary()["feasible"] is True
    # expert 0: its best window routes 3 < 5 (the pool has 6); expert 1: the pool has 1 < 5
    s = routing.coverage_of(np.array([[[3, 0]], [[3, 0]], [[0, 1]]]), [0], 5, k=1).summary()
    assert s["infeasible"]["budget_short"] == [[0, 0]] and s["infeasible"]["pool_short"] == [[0, 1]]


@pytest.mark.parametrize("seed", range(10))
def test_planted_cover_is_found(seed):
    # a feasible budget: windows 0..5 each route m tokens to one expert in both layers
    rng = np.random.default_rng(seed)
    n, k, m = 40, 6, 20
    counts = rng.integers(0, 4, size=(n, 2, 6)) * (rng.random((n, 2, 6)) < 0.3)
    for j in range(k):
        counts[j, :, j] += m
    concepts = [rng.choice(50, 5, replace=False) for _ in range(n)]
    chosen, _ = _greedy(counts, k, m, concepts=concepts)
    s = routing.coverage_of(counts, chosen, m, k).summary()
    assert s["feasible"] and s["starved_experts"] == 0 and s["tokens_per_expert_min"] >= m


def test_deterministic_given_the_seed_and_zipcal_order_at_beta_zero():
    rng = np.random.default_rng(7)
    counts = rng.integers(0, 6, size=(60, 2, 4))
    concepts = [rng.choice(300, 12, replace=False).astype(np.int32) for _ in range(60)]
    a = _greedy(counts, 10, 30, concepts=concepts, seed=3, pool=5)
    assert a == _greedy(counts, 10, 30, concepts=concepts, seed=3, pool=5)
    assert len(set(a[0])) == 10
    z = _greedy(counts, 10, 30, beta=0.0, concepts=concepts, seed=3, pool=5)[0]
    assert z == zipcal_greedy(concepts, 10, np.random.default_rng(3), pool=5)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="counts must be"):
        _greedy(np.zeros((2, 4)), 1, 1)
    with pytest.raises(ValueError, match=">= 0"):
        _greedy(TABLE, 1, -1)


def _windows(n):
    return [Window(f"f:0:{i}", "s", [str(i)], np.full(4, i, np.int32), np.array([1], np.int32)) for i in range(n)]


def test_two_round_method_probes_each_window_once():
    calls = []

    def route_fn(ids):
        calls.extend(int(x[0]) for x in ids)
        return np.array([TABLE[int(x[0])] for x in ids])

    m = SELECTORS.get("routing")
    assert "router" in m.needs
    ctx = SelectContext(seed=0, extra={"route_fn": route_fn, "min_tokens_per_expert": 3})
    wins = m.local(_windows(5), 2, ctx, "f:0")
    assert [w.uid for w in wins] == ["f:0:2", "f:0:3"]
    assert [w.score for w in wins] == pytest.approx([1 + 16 * 6 / 9, 16.0])  # gain when picked
    assert ctx.extra["routing_coverage"]["f:0"].summary()["starved_experts"] == 0
    a = m.merge(list(wins), 2, ctx)
    b = m.merge(list(reversed(wins)), 2, ctx)
    assert [w.uid for w in a] == [w.uid for w in b] == ["f:0:2", "f:0:3"]
    assert sorted(calls) == [0, 1, 2, 3, 4]  # merge reused the cached counts
    with pytest.raises(ValueError, match="route_fn"):
        m.local(_windows(2), 1, SelectContext(seed=0), "f:0")


# ---- the probe on a tiny random Qwen3-MoE ----

def _tiny_moe(layers=2):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_experts=8, num_experts_per_tok=2, max_position_embeddings=64)
    return Qwen3MoeForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def moe():
    return _tiny_moe()


def _ids(n=5, t=16):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 128, t).astype(np.int32) for _ in range(n)]


def test_probe_matches_the_models_router_logits(moe):
    assert len(find_routers(moe)) == 2
    probe = RouterProbe(moe, 2, batch=2)
    ids = probe.expert_ids(_ids())
    assert ids.shape == (5, 2, 16, 2)
    with torch.no_grad():
        out = moe(input_ids=torch.tensor(np.stack(_ids()), dtype=torch.long), output_router_logits=True)
    ref = torch.stack([torch.topk(lg, 2, dim=-1).indices.reshape(5, 16, 2) for lg in out.router_logits], dim=1)
    assert np.array_equal(np.sort(ids, -1), np.sort(ref.numpy(), -1))
    counts = probe(_ids())
    assert counts.shape == (5, 2, 8) and (counts.sum(-1) == 16 * 2).all()


def test_probe_stops_after_the_last_probed_router(moe):
    ran = []
    handle = moe.model.layers[1].register_forward_hook(lambda *a: ran.append(1))
    try:
        one = RouterProbe(moe, 1).expert_ids(_ids())
    finally:
        handle.remove()
    assert ran == [] and one.shape == (5, 1, 16, 2)
    assert np.array_equal(one, RouterProbe(moe, 2).expert_ids(_ids())[:, :1])


def test_load_probe_loads_only_the_probed_layers(moe, tmp_path):
    moe.save_pretrained(tmp_path)
    probe = load_probe(tmp_path, 1, device="cpu")
    assert len(find_routers(probe.model)) == 1
    assert np.array_equal(probe.expert_ids(_ids()), RouterProbe(moe, 1).expert_ids(_ids()))


def test_probe_refusals(moe):
    with pytest.raises(ValueError, match="2 routers"):
        RouterProbe(moe, 3)
    with pytest.raises(ValueError, match="one length"):
        RouterProbe(moe, 1).expert_ids([np.zeros(4, np.int32), np.zeros(5, np.int32)])
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match="0 routers"):
        RouterProbe(dense, 1)
