"""Mixture-of-experts layers: table rows, loading per-expert checkpoints into fused experts,
ExpertTap's per-expert inputs against a plain loop over tokens, and checkpoints written back."""
import json

import pytest
import torch

from raycompress.models.arch import ARCHITECTURES
from raycompress.models.moe import (ExpertTap, check_layer_layout, expert_groups, expert_weights, is_moe_layer,
                                    layer_input_groups, route, set_expert_weights, to_checkpoint, to_live)
from raycompress.models.validate import CheckpointError
from raycompress.models.weights import OffloadedModel
from tests.models.moe_fixtures import MOE_ARCHS, make_tiny_moe

EXTRA = {"Qwen3MoeForCausalLM": {"mlp_only_layers": [1]}}  # layer 1 is a dense MLP


@pytest.fixture(scope="module", params=MOE_ARCHS)
def moe_dir(request, tmp_path_factory):
    """(arch, folder, the model saved there)."""
    arch = request.param
    path = tmp_path_factory.mktemp(arch)
    return arch, path, make_tiny_moe(path, arch, **EXTRA.get(arch, {}))


def _ids(n=2, seq=8):
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(1))


def _block_input(layer, block, hidden, kwargs):
    """(the layer's output, the MoE block's input flattened to (N, H))."""
    seen = {}
    handle = block.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    try:
        out = layer(hidden, **kwargs)
    finally:
        handle.remove()
    return out, seen["x"].reshape(-1, seen["x"].shape[-1])


def test_rows_match_the_live_modules(moe_dir):
    arch, path, model = moe_dir
    spec = ARCHITECTURES[arch]
    moe, cfg = spec.moe, model.config
    layer = model.model.layers[0]
    e, inter = getattr(cfg, moe.num_experts_key), getattr(cfg, moe.intermediate_key)
    experts = layer.get_submodule(moe.path(moe.experts))
    assert getattr(experts, moe.gate_up).shape == (e, 2 * inter, cfg.hidden_size)
    assert getattr(experts, moe.down).shape == (e, cfg.hidden_size, inter)
    assert layer.get_submodule(moe.path(moe.router)).weight.shape == (e, cfg.hidden_size)
    for name in moe.never_compress:
        assert isinstance(layer.get_submodule(name), torch.nn.Module)
    groups = layer_input_groups(layer, spec)
    assert groups[: len(spec.input_groups)] == spec.input_groups
    assert all(isinstance(layer.get_submodule(n), torch.nn.Linear) for g in groups for n in g)
    assert (moe.shared_expert is not None) == bool(moe.shared_groups) == (arch == "Qwen2MoeForCausalLM")
    assert expert_groups(spec, 3) == (("mlp.experts.3.gate", "mlp.experts.3.up"), ("mlp.experts.3.down",))
    dense = model.model.layers[1]
    assert is_moe_layer(dense, spec) == (arch != "Qwen3MoeForCausalLM")
    if not is_moe_layer(dense, spec):
        assert layer_input_groups(dense, spec) == spec.input_groups + moe.dense_groups
        assert all(isinstance(dense.get_submodule(n), torch.nn.Linear) for g in moe.dense_groups for n in g)
        with pytest.raises(ValueError, match="no mixture-of-experts"):
            ExpertTap(dense, spec, lambda *a: None)


def test_layers_equal_transformers_and_the_checkpoint(moe_dir):
    """Loaded from the per-expert checkpoint, every layer equals (bit for bit) the layer
    transformers loads, and the expert views are the checkpoint's tensors."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    arch, path, _ = moe_dir
    full = AutoModelForCausalLM.from_pretrained(path).eval()
    m = OffloadedModel(path)
    m.check_files()
    ids = _ids()
    with torch.no_grad():
        ref = full(ids, output_hidden_states=True).hidden_states
        hidden, kwargs = m.layer_inputs(ids)
        for i in range(m.num_layers):
            layer = m.load_layer(i)
            want = full.model.layers[i].state_dict()
            assert set(layer.state_dict()) == set(want)
            assert all(torch.equal(v, want[k]) for k, v in layer.state_dict().items())
            hidden = layer(hidden, **kwargs)
        torch.testing.assert_close(full.model.norm(hidden), ref[-1], atol=0, rtol=0)
    tmpl = dict(ARCHITECTURES[arch].moe.checkpoint_experts)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        views = expert_weights(m.load_layer(0), m.spec, 5)
        for role, view in views.items():
            assert torch.equal(view, f.get_tensor("model.layers.0." + tmpl[role].format(e=5)))


@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
def test_tap_hessians_equal_a_loop_over_tokens(moe_dir, impl):
    arch, path, _ = moe_dir
    m = OffloadedModel(path)
    spec = m.spec
    layer = m.load_layer(0)
    block = layer.get_submodule(spec.moe.block)
    experts = block.get_submodule(spec.moe.experts)
    experts.config._experts_implementation = impl
    hidden, kwargs = m.layer_inputs(_ids())
    n_exp, top_k = 8, 2
    hess_in = torch.zeros(n_exp, 32, 32, dtype=torch.float64)
    hess_mid = torch.zeros(n_exp, 32, 32, dtype=torch.float64)
    counts, tokens, wsum, shared = torch.zeros(n_exp, dtype=torch.long), {}, torch.zeros(n_exp, dtype=torch.float64), {}

    def on_expert(e, x, h, w, tok):
        hess_in[e] += x.double().T @ x.double()
        hess_mid[e] += h.double().T @ h.double()
        counts[e] += x.shape[0]
        tokens[e] = set(tok.tolist())
        wsum[e] += w.double().sum()

    with torch.no_grad():
        plain, x_blk = _block_input(layer, block, hidden, kwargs)
        with ExpertTap(layer, spec, on_expert, lambda g, x: shared.setdefault(g, x), with_tokens=True):
            tapped = layer(hidden, **kwargs)
        assert "forward" not in experts.__dict__  # restored
        idx, w, logits = route(block, x_blk, spec)
    assert torch.equal(tapped, plain)
    assert int(counts.sum()) == x_blk.shape[0] * top_k and logits.shape == (x_blk.shape[0], n_exp)
    ref_in, ref_mid = torch.zeros_like(hess_in), torch.zeros_like(hess_mid)
    ref_w, ref_tokens = torch.zeros_like(wsum), {}
    for t in range(x_blk.shape[0]):  # the reference: a plain loop over tokens and their top-k experts
        for k in range(top_k):
            e = int(idx[t, k])
            v = expert_weights(layer, spec, e)
            x = x_blk[t].double()
            h = experts.act_fn(v["gate"].double() @ x) * (v["up"].double() @ x)
            ref_in[e] += torch.outer(x, x)
            ref_mid[e] += torch.outer(h, h)
            ref_w[e] += float(w[t, k])
            ref_tokens.setdefault(e, set()).add(t)
    torch.testing.assert_close(hess_in, ref_in, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hess_mid, ref_mid, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(wsum, ref_w, rtol=1e-12, atol=1e-12)
    assert tokens == ref_tokens
    if spec.moe.shared_groups:
        gate_up, down = (g[0] for g in spec.moe.shared_groups)
        assert torch.equal(shared[gate_up], x_blk)
        assert shared[down].shape == (x_blk.shape[0], 40)
    else:
        assert not shared


def test_an_expert_without_tokens_gets_no_callback(moe_dir):
    arch, path, _ = moe_dir
    m = OffloadedModel(path)
    layer = m.load_layer(0)
    block = layer.get_submodule(m.spec.moe.block)
    x = torch.randn(1, 1, 32, generator=torch.Generator().manual_seed(2))  # one token: 2 of 8 experts
    called = []
    with torch.no_grad():
        plain = block(x)
        with ExpertTap(layer, m.spec, lambda e, *a: called.append(e)):
            tapped = block(x)
        idx, _, _ = route(block, x, m.spec)
    assert torch.equal(tapped, plain)
    assert called == sorted(idx.flatten().tolist()) and len(called) == 2


@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
def test_tap_is_bit_identical_in_bf16(moe_dir, impl):
    _, path, _ = moe_dir
    m = OffloadedModel(path, dtype=torch.bfloat16)
    layer = m.load_layer(0)
    block = layer.get_submodule(m.spec.moe.block)
    block.get_submodule(m.spec.moe.experts).config._experts_implementation = impl
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    dtypes = set()
    with torch.no_grad():
        plain = block(x)
        with ExpertTap(layer, m.spec, lambda e, xi, h, w: dtypes.add((xi.dtype, h.dtype))):
            tapped = block(x)
    assert torch.equal(tapped, plain) and dtypes == {(torch.bfloat16, torch.bfloat16)}


def test_all_tokens_reaches_every_expert_and_keeps_the_output(moe_dir):
    _, path, _ = moe_dir
    m = OffloadedModel(path)
    layer = m.load_layer(0)
    block = layer.get_submodule(m.spec.moe.block)
    x = torch.randn(1, 3, 32, generator=torch.Generator().manual_seed(4))
    seen = {}
    with torch.no_grad():
        plain = block(x)
        with ExpertTap(layer, m.spec, lambda e, xi, h, w, tok: seen.setdefault(e, (xi, w, tok)),
                       with_tokens=True, all_tokens=True):
            tapped = block(x)
        idx, weights, _ = route(block, x, m.spec)
    assert torch.equal(tapped, plain) and sorted(seen) == list(range(8))
    for e, (xi, w, tok) in seen.items():
        assert torch.equal(xi, x[0]) and tok.tolist() == [0, 1, 2]
        want = [float(weights[t][idx[t] == e].sum()) for t in range(3)]
        assert w.tolist() == want


def test_tap_restores_forward_when_the_body_raises(moe_dir):
    _, path, _ = moe_dir
    m = OffloadedModel(path)
    layer = m.load_layer(0)
    experts = layer.get_submodule(m.spec.moe.path(m.spec.moe.experts))
    with pytest.raises(RuntimeError, match="boom"):
        with ExpertTap(layer, m.spec, lambda *a: None):
            assert "forward" in experts.__dict__
            raise RuntimeError("boom")
    assert "forward" not in experts.__dict__


def _write_folder(m, out, layout):
    """A checkpoint folder as the engine writes one: one shard per layer (`layout`: live state_dict
    names, checkpoint per-expert names, or layer 0 live and the others per expert), the rest, index."""
    from raycompress.models.checkpoint import finalize_checkpoint, shard_name, write_shard

    names, total = [], m.num_layers + 1
    for i in range(m.num_layers):
        state = m.load_layer(i).state_dict()
        if layout == "checkpoint" or (layout == "mixed" and i > 0):
            state = to_checkpoint(state, m.spec)
        names.append(shard_name(i, total))
        write_shard({f"{m.layer_prefix(i)}.{k}": v for k, v in state.items()}, out / names[-1])
    names.append(shard_name(m.num_layers, total))
    write_shard(m.read_outside_layers(), out / names[-1])
    finalize_checkpoint(out, m.model_dir, names)
    return names


@pytest.mark.parametrize("layout", ["live", "checkpoint", "mixed"])
def test_written_layers_round_trip_and_transformers_loads_them(moe_dir, tmp_path, layout):
    from transformers import AutoModelForCausalLM

    arch, path, model = moe_dir
    m = OffloadedModel(path)
    names = _write_folder(m, tmp_path, layout)
    for i in range(m.num_layers):
        back = m.load_layer_from_shard(i, tmp_path / names[i]).state_dict()
        want = m.load_layer(i).state_dict()
        assert set(back) == set(want) and all(torch.equal(back[k], want[k]) for k in want)
    OffloadedModel(tmp_path).check_files()
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    want = model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in reloaded.state_dict().items())


def test_to_live_and_to_checkpoint_are_inverse(moe_dir):
    arch, _, model = moe_dir
    spec = ARCHITECTURES[arch]
    live = model.model.layers[0].state_dict()
    ckpt = to_checkpoint(live, spec)
    assert not any("gate_up_proj" in k for k in ckpt) and len(ckpt) == len(live) - 2 + 3 * 8
    back = to_live(ckpt, spec, 8)
    assert set(back) == set(live) and all(torch.equal(back[k], live[k]) for k in live)
    check_layer_layout(ckpt, spec, 8, "layer 0")
    check_layer_layout(live, spec, 8, "layer 0")


def _rewrite(src, dst, drop=(), config=None):
    """Copy checkpoint `src` to `dst` without tensors `drop`, with those of config fields `config` that
    config.json holds changed."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    state = {k: v for k, v in load_file(src / "model.safetensors").items() if k not in drop}
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg.update({k: v for k, v in (config or {}).items() if k in cfg})
    (dst / "config.json").write_text(json.dumps(cfg))


def test_a_layout_that_does_not_match_the_row_is_refused(moe_dir, tmp_path):
    arch, path, _ = moe_dir
    moe = ARCHITECTURES[arch].moe
    up3 = "model.layers.0." + dict(moe.checkpoint_experts)["up"].format(e=3)
    _rewrite(path, tmp_path / "missing", drop=[up3])
    with pytest.raises(CheckpointError, match="missing"):
        OffloadedModel(tmp_path / "missing").check_files()
    with pytest.raises(CheckpointError, match=up3[len("model.layers.0."):].replace(".", "[.]")):
        OffloadedModel(tmp_path / "missing").load_layer(0)
    # expert 7 is one too many (Qwen3-MoE's config.json spells num_experts as num_local_experts)
    _rewrite(path, tmp_path / "seven", config={"num_experts": 7, "num_local_experts": 7})
    with pytest.raises(CheckpointError, match=f"belongs to no expert.*{moe.num_experts_key}=7"):
        OffloadedModel(tmp_path / "seven").check_files()
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        router = [k for k in f.keys() if k.startswith("model.layers.0.") and k.endswith(".gate.weight")]
    assert len(router) == 1
    _rewrite(path, tmp_path / "norouter", drop=router)
    with pytest.raises(CheckpointError, match="router"):
        OffloadedModel(tmp_path / "norouter").check_files()


def test_set_expert_weights_writes_the_layer(moe_dir):
    _, path, _ = moe_dir
    m = OffloadedModel(path)
    layer = m.load_layer(0)
    new = {"down": torch.zeros(32, 32)}
    set_expert_weights(layer, m.spec, 2, new)
    assert torch.equal(expert_weights(layer, m.spec, 2)["down"], new["down"])
    assert not torch.equal(expert_weights(layer, m.spec, 3)["down"], new["down"])
    with pytest.raises(ValueError, match="shape"):
        set_expert_weights(layer, m.spec, 2, {"gate": torch.zeros(16, 32)})
    with pytest.raises(KeyError):
        set_expert_weights(layer, m.spec, 2, {"w1": torch.zeros(32, 32)})
    with pytest.raises(IndexError):
        expert_weights(layer, m.spec, 8)
