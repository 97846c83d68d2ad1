"""Mixture-of-experts layers through the layer pipeline (LocalBackend, no Ray) on tiny random MoE
checkpoints (`tests.models.moe_fixtures`): per-expert statistics from routed tokens against a plain
loop, bit-identical checkpoints for 1, 2 and 3 workers (float64 statistics), the low-token policy on
experts that receive no token, stock transformers loading the outputs, and preflight refusals."""
import json

import pytest
import torch
from safetensors.torch import load_file

from raycompress.config import CompressConfig
from raycompress.engine.experts import ExpertStarved
from raycompress.engine.pipeline import LocalBackend, Plan, compress_layers
from raycompress.engine.transfer import shard_calibration
from raycompress.engine.worker import LayerWorker
from raycompress.models.moe import expert_weights, route
from raycompress.models.weights import OffloadedModel
from tests.models.moe_fixtures import make_tiny_moe

QUANT = dict(algorithm="gptq", quant={"bits": 4, "group_size": 8})  # divides the shared expert's 40
SPARSE = dict(algorithm="sparsegpt", sparsity=0.5)


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    out = {}
    for arch in ("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM", "MixtralForCausalLM"):
        out[arch] = tmp_path_factory.mktemp(arch) / "m"
        make_tiny_moe(out[arch], arch)
    return out


def _ids(n=6, seq=8, seed=0):
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def _run(model_dir, ids, out, cfg, k):
    shards = shard_calibration(ids.shape[0], k, cfg.micro_batch)
    assert len(shards) == k
    workers = [LayerWorker(str(model_dir), ids[s.rows], micro_batch=cfg.micro_batch, hessian_dtype=torch.float64,
                           rank=r) for r, s in enumerate(shards)]
    return compress_layers(LocalBackend(workers), OffloadedModel(model_dir), cfg, out, "fp")


def _shards(folder):
    return {p.name: load_file(p) for p in sorted((folder / "model").glob("*.safetensors"))}


def test_expert_statistics_equal_a_plain_loop(moe_dirs):
    """Every expert's gate/up Hessian is Σ x xᵀ over the tokens routed to it, its down Hessian
    Σ w² h hᵀ (router weight w, h = act(gate x) * up x); the shared expert's is over every token."""
    path = moe_dirs["Qwen2MoeForCausalLM"]
    om = OffloadedModel(path)
    cfg = CompressConfig(**SPARSE, micro_batch=2, hessian_dtype="float64")
    plan = Plan(om, cfg, 1)
    w = LayerWorker(str(path), _ids(4), micro_batch=2, hessian_dtype=torch.float64)
    w.begin_layer(0)
    counts = w.accumulate(plan.stat_groups, plan.split, plan.extras, plan.kv)
    spec, block = om.spec, w.layer.get_submodule(om.spec.moe.block)
    seen = []
    hook = block.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        w._run_all(keep=False)
        hook.remove()
        x_all = torch.cat(seen)
        idx, weights, _ = route(block, x_all, spec)
    act = block.get_submodule(spec.moe.experts).act_fn
    ref = {e: [torch.zeros(32, 32, dtype=torch.float64), torch.zeros(32, 32, dtype=torch.float64), 0] for e in range(8)}
    for t in range(x_all.shape[0]):
        for j in range(idx.shape[1]):
            e, x = int(idx[t, j]), x_all[t].float()
            v = expert_weights(w.layer, spec, e)
            h = (act(v["gate"] @ x) * (v["up"] @ x)) * weights[t, j].float()
            ref[e][0] += torch.outer(x, x).double()
            ref[e][1] += torch.outer(h, h).double()
            ref[e][2] += 1
    for e, (h_in, h_mid, n) in ref.items():
        assert counts[f"mlp.experts.{e}#routed"] == n == w.stats[f"mlp.experts.{e}.gate"].tokens
        for key, ref_h in (("gate", h_in), ("down", h_mid)):  # float32 products per micro-batch vs float64 per token
            torch.testing.assert_close(w.stats[f"mlp.experts.{e}.{key}"].value, ref_h, rtol=1e-5,
                                       atol=1e-6 * float(ref_h.abs().max()) + 1e-12)
    shared = w.stats["mlp.shared_expert.gate_proj"]
    assert shared.tokens == x_all.shape[0]
    ref_s = x_all.double().T @ x_all.double()
    torch.testing.assert_close(shared.value, ref_s, rtol=1e-5, atol=1e-6 * float(ref_s.abs().max()))
    assert set(plan.groups) >= {"self_attn.q_proj", "mlp.shared_expert.gate_proj", "mlp.experts.7.down"}
    assert not {"mlp.gate", "mlp.shared_expert_gate"} & set(plan.targets)  # never compressed


@pytest.mark.parametrize("arch", ["Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM"])
@pytest.mark.parametrize("recipe", ["gptq-int4", "sparsegpt"])
def test_identical_across_workers_and_per_expert_names(arch, recipe, moe_dirs, tmp_path):
    """1, 2 and 3 workers write the same bytes; experts are written under the Hub's per-expert
    names (quantized: packed per expert), every expert was solved by GPTQ/SparseGPT from its
    own statistics (tokens recorded), and the owners of a layer's expert groups are all workers."""
    cfg = CompressConfig(**(QUANT if recipe == "gptq-int4" else SPARSE), micro_batch=2, hessian_dtype="float64")
    ids = _ids()
    runs = {k: _run(moe_dirs[arch], ids, tmp_path / f"k{k}", cfg, k) for k in (1, 2, 3)}
    shards = {k: _shards(tmp_path / f"k{k}") for k in runs}
    for k in (2, 3):
        assert shards[k].keys() == shards[1].keys()
        for name, tensors in shards[1].items():
            assert tensors.keys() == shards[k][name].keys()
            assert all(torch.equal(t, shards[k][name][n]) for n, t in tensors.items()), (k, name)
    keys = set().union(*(t.keys() for t in shards[1].values()))
    suffix = "weight_packed" if recipe == "gptq-int4" else "weight"
    assert all(f"model.layers.0.mlp.experts.{e}.{p}_proj.{suffix}" in keys for e in range(8) for p in ("gate", "up", "down"))
    assert not any("gate_up_proj" in k for k in keys)
    recs = [r for r in runs[3] if "expert" in r]
    assert len(recs) == 2 * 8 * 3 and all(r["tokens"] > 0 and "fallback" not in r and r["damping"] == 0.01 for r in recs)
    assert sum(r["tokens"] for r in recs if r["layer"] == 0 and r["module"].endswith(".gate")) == ids.numel() * 2
    plan = Plan(OffloadedModel(moe_dirs[arch]), cfg, 3)
    assert {plan.owners[g] for g in plan.experts} == {0, 1, 2}
    if recipe == "gptq-int4":
        ignore = json.loads((tmp_path / "k1" / "model" / "config.json").read_text())["quantization_config"]["ignore"]
        assert "re:.*\\.mlp[.]gate$" in ignore
        assert ("re:.*\\.mlp[.]shared_expert_gate$" in ignore) == (arch == "Qwen2MoeForCausalLM")


def test_stock_transformers_loads_every_output(moe_dirs, tmp_path):
    """Sparse outputs of each MoE row load in stock transformers with no missing or unexpected
    keys and run; the quantized output dequantizes through `models.load` (compressed-tensors)."""
    from transformers import AutoModelForCausalLM

    cfg = CompressConfig(**SPARSE, micro_batch=2)
    ids = _ids(4)
    for arch, path in moe_dirs.items():
        _run(path, ids, tmp_path / arch, cfg, 1)
        model, info = AutoModelForCausalLM.from_pretrained(tmp_path / arch / "model", output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (arch, info)
        w = model.model.layers[0].mlp.experts.gate_up_proj
        assert 0.45 < float((w == 0).float().mean()) < 0.55, arch
        assert torch.isfinite(model(ids).logits).all()
    path = moe_dirs["Qwen2MoeForCausalLM"]  # int4 experts packed per expert: compressed-tensors decompresses them
    _run(path, ids, tmp_path / "q", CompressConfig(**QUANT, micro_batch=2), 1)
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "q" / "model", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    dense = AutoModelForCausalLM.from_pretrained(path)
    w, w0 = model.model.layers[1].mlp.experts.down_proj, dense.model.layers[1].mlp.experts.down_proj
    assert not torch.equal(w, w0) and float(torch.linalg.norm(w - w0) / torch.linalg.norm(w0)) < 0.3


def _starved(path, tmp_path, cfg_kw, policy, min_tokens=1):
    """3 tokens x top-2 reach at most 6 of 8 experts: some experts get no token."""
    cfg = CompressConfig(**cfg_kw, micro_batch=1, moe={"policy": policy, "min_tokens_per_expert": min_tokens})
    return _run(path, _ids(1, 3), tmp_path / policy, cfg, 1)


@pytest.mark.parametrize("recipe", ["gptq-int4", "sparsegpt"])
def test_an_expert_without_tokens_takes_each_policy(recipe, moe_dirs, tmp_path):
    path = moe_dirs["Qwen3MoeForCausalLM"]
    kw = QUANT if recipe == "gptq-int4" else SPARSE
    recs = _starved(path, tmp_path, kw, "fallback")
    starved = [r for r in recs if "fallback" in r]
    assert starved and all(r["tokens"] == 0 for r in starved)
    assert all(r["fallback"]["method"] == ("rtn" if recipe == "gptq-int4" else "magnitude")
               and "0 routed tokens < min_tokens_per_expert=1" in r["fallback"]["reason"] for r in starved)
    assert all("damping" in r for r in recs if "expert" in r and "fallback" not in r)
    shards = _shards(tmp_path / "fallback")
    assert all(torch.isfinite(t.float()).all() for s in shards.values() for t in s.values())  # never a NaN scale
    if recipe == "sparsegpt":
        assert all(r["sparsity"] == 0.5 for r in starved)
    recs = _starved(path, tmp_path, kw, "all_tokens")
    experts = [r for r in recs if "expert" in r]
    assert not any("fallback" in r for r in experts) and any(r["tokens"] == 0 for r in experts)
    assert all("damping" in r for r in experts)  # every expert solved from statistics of all tokens
    with pytest.raises(ExpertStarved, match=r"layer 0 expert \d \(mlp.experts.\d\): 0 routed calibration tokens "
                                            r"< compress.moe.min_tokens_per_expert=1 with policy refuse"):
        _starved(path, tmp_path, kw, "refuse")
    assert not (tmp_path / "refuse" / "model").exists()  # stopped before any layer was written


def test_a_threshold_above_the_routed_tokens_falls_back_and_mixtral_names(moe_dirs, tmp_path):
    """Mixtral: experts under block_sparse_moe.experts.{e}.w1/w2/w3, router ignored; a threshold
    above every expert's routed tokens sends every expert to the fallback, each listed."""
    path = moe_dirs["MixtralForCausalLM"]
    cfg = CompressConfig(**QUANT, micro_batch=2, moe={"policy": "fallback", "min_tokens_per_expert": 10**4})
    recs = _run(path, _ids(4), tmp_path, cfg, 2)
    experts = [r for r in recs if "expert" in r]
    assert len(experts) == 2 * 8 * 3 and all(r["fallback"]["method"] == "rtn" for r in experts)
    keys = set().union(*(t.keys() for t in _shards(tmp_path).values()))
    assert "model.layers.1.block_sparse_moe.experts.7.w2.weight_packed" in keys
    assert "model.layers.1.block_sparse_moe.gate.weight" in keys
    ignore = json.loads((tmp_path / "model" / "config.json").read_text())["quantization_config"]["ignore"]
    assert "re:.*\\.block_sparse_moe[.]gate$" in ignore


def _job(model, corpus, n_samples=2, seq_len=16, **compress):
    from raycompress.config import JobConfig

    return JobConfig.model_validate({
        "model": str(model), "base_dir": ".", "select": {"sources": {"a": {"path": str(corpus)}},
                                                        "n_samples": n_samples, "seq_len": seq_len},
        "compress": {"algorithm": "sparsegpt", "sparsity": 0.5, **compress}, "evaluate": {"tasks": []},
        "ray": {"cpus_per_actor": 1}})


def test_preflight_accepts_moe_and_refuses_an_impossible_policy(moe_dirs, tmp_path):
    from raycompress.distributed.plan import PreflightError, build_plan, preflight
    from raycompress.models.fetch import ModelRef

    path = moe_dirs["Qwen3MoeForCausalLM"]
    ref = ModelRef(str(path))
    corpus = tmp_path / "a.jsonl"
    corpus.write_text(json.dumps({"text": "word " * 400}) + "\n")
    preflight(_job(path, corpus), ref)  # 32 tokens x top-2 over 8 experts: 8 each at best
    preflight(_job(path, corpus, moe={"policy": "refuse", "min_tokens_per_expert": 8}), ref)
    with pytest.raises(PreflightError, match=r"^compress.moe.min_tokens_per_expert: 9 routed tokens for each of the 8 "
                                             r"experts of module model.layers.\*.mlp.experts needs at least 36"):
        preflight(_job(path, corpus, moe={"policy": "refuse", "min_tokens_per_expert": 9}), ref)
    with pytest.raises(PreflightError, match=r"^compress.moe.min_tokens_per_expert: 33 tokens per expert of module "
                                             r"model.layers.\*.mlp.experts, but the calibration set has 32 tokens"):
        preflight(_job(path, corpus, moe={"policy": "all_tokens", "min_tokens_per_expert": 33}), ref)
    with pytest.raises(PreflightError, match=r"^compress.owl: not supported on mixture-of-experts layers"):
        preflight(_job(path, corpus, owl={}), ref)
    with pytest.raises(PreflightError, match=r"^compress.quant.group_size: group size 64 does not divide d_in=32 "
                                             r"of module self_attn.q_proj"):
        preflight(_job(path, corpus, algorithm="gptq", quant={"bits": 4, "group_size": 64}), ref)
    plan = build_plan(_job(path, corpus, algorithm="gptq", quant={"bits": 4, "group_size": 16}), ref, 0)
    compress = next(s for s in plan["stages"] if s["stage"] == "compress")
    assert compress["targets_per_layer"] == 4 + 8 * 3 and compress["bytes_moved_per_layer"] == 0


def test_smoothquant_is_restricted_to_attention_and_static_scales_need_tokens(moe_dirs, tmp_path):
    """SmoothQuant smooths the group a norm feeds in the table row: on MoE rows the attention input
    only (the norm before the block also feeds the router); experts are quantized unsmoothed. An
    expert with no token cannot get a static FP8 input scale: refused before solving."""
    path = moe_dirs["Qwen3MoeForCausalLM"]
    cfg = CompressConfig(algorithm="gptq", scheme="W8A8-INT8", smoothquant={"alpha": 0.5}, micro_batch=2)
    recs = _run(path, _ids(4), tmp_path / "sq", cfg, 2)
    smoothed = {r["module"] for r in recs if "smooth_alpha" in r}
    assert smoothed == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}
    assert all("expert" in r and r["tokens"] > 0 for r in recs if r["module"].startswith("mlp."))
    with pytest.raises(ExpertStarved, match=r"no routed calibration token, and scheme FP8 stores a calibrated input"):
        _starved(path, tmp_path, dict(algorithm="rtn", scheme="FP8"), "fallback")
    recs = _starved(path, tmp_path, dict(algorithm="rtn", scheme="FP8"), "all_tokens")
    shards = _shards(tmp_path / "all_tokens")
    scales = [t for s in shards.values() for n, t in s.items() if "experts" in n and n.endswith("input_scale")]
    assert len(scales) == 2 * 8 * 3 and all(torch.isfinite(t.float()).all() and float(t) > 0 for t in scales)


def test_resume_replays_quantized_experts(moe_dirs, tmp_path):
    """A rerun in the same folder replays every layer from its shard (per-expert packed tensors
    unpacked and fused again) and writes the same bytes and records."""
    path = moe_dirs["Qwen3MoeForCausalLM"]
    cfg = CompressConfig(**QUANT, micro_batch=2, hessian_dtype="float64")
    first = _run(path, _ids(4), tmp_path, cfg, 2)
    before = _shards(tmp_path)
    again = _run(path, _ids(4), tmp_path, cfg, 2)
    assert again == first
    after = _shards(tmp_path)
    assert all(torch.equal(t, after[f][n]) for f, s in before.items() for n, t in s.items())


def test_low_token_plan_threshold_zero_still_catches_token_less_experts(moe_dirs):
    from raycompress.engine.experts import low_token_plan

    spec = OffloadedModel(moe_dirs["Qwen3MoeForCausalLM"]).spec
    cfg = CompressConfig(**SPARSE, moe={"policy": "fallback", "min_tokens_per_expert": 0})
    plan = low_token_plan(spec, cfg, 3, {0: 5, 1: 0}, 3)  # expert 2 absent: no token either
    assert plan == {1: {"tokens": 0, "method": "magnitude", "reason": "no routed token (no statistics)"},
                    2: {"tokens": 0, "method": "magnitude", "reason": "no routed token (no statistics)"}}
    cfg = CompressConfig(**QUANT, moe={"policy": "fallback", "min_tokens_per_expert": 6})
    assert low_token_plan(spec, cfg, 3, {0: 6, 1: 5, 2: 7}, 3) == {
        1: {"tokens": 5, "method": "rtn", "reason": "5 routed tokens < min_tokens_per_expert=6"}}
    assert low_token_plan(spec, cfg.model_copy(update={"moe": cfg.moe.model_copy(update={"policy": "all_tokens"})}),
                          3, {0: 0}, 3) == {}


def test_targets_by_prefix_and_owners_balanced_by_cost(moe_dirs):
    om = OffloadedModel(moe_dirs["Qwen2MoeForCausalLM"])
    plan = Plan(om, CompressConfig(**QUANT, targets=["mlp.experts.3", "mlp.shared_expert"]), 2)
    assert plan.targets == ["mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj",
                            "mlp.experts.3.gate", "mlp.experts.3.up", "mlp.experts.3.down"]
    assert plan.shapes["mlp.experts.3.down"] == (32, 32) and plan.experts == {"mlp.experts.3.gate", "mlp.experts.3.down"}
    with pytest.raises(ValueError, match=r"compress.targets: \['mlp.experts.99'\] are not linears"):
        Plan(om, CompressConfig(**QUANT, targets=["mlp.experts.99"]), 2)
    plan = Plan(om, CompressConfig(**QUANT), 3)
    load = [0.0] * 3
    for g, names in plan.groups.items():
        load[plan.owners[g]] += sum(plan.algo.cost(*plan.shapes[t]) for t in names)
    assert max(load) - min(load) <= max(plan.algo.cost(*s) * 2 for s in plan.shapes.values())  # LPT: within one item
