"""engine.kv.KVObserver: max |k|, max |v| of what one attention module caches (after k_norm and RoPE),
checked against the states computed by hand from the module's own projections."""
from __future__ import annotations

import pytest
import torch

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=64)


def _model(kind: str):
    import transformers as tf

    torch.manual_seed(0)
    if kind == "opt":
        cfg = tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=1, num_attention_heads=4,
                           vocab_size=128, max_position_embeddings=64, word_embed_proj_dim=64)
        return tf.OPTForCausalLM(cfg).eval()
    cfg_cls, model_cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
                          "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
                          "mistral": (tf.MistralConfig, tf.MistralForCausalLM)}[kind]
    model = model_cls(cfg_cls(**SMALL)).eval()
    if kind == "qwen3":  # non-trivial k_norm weights, so skipping it would show
        with torch.no_grad():
            model.model.layers[0].self_attn.k_norm.weight.uniform_(0.5, 2.0)
    return model


def _layer_inputs(model, seq: int = 7, seed: int = 1):
    """(hidden (2, seq, 64), layer kwargs) as the worker passes them to a decoder layer."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, seq, 64, generator=gen)
    if not hasattr(model.model, "rotary_emb"):
        return hidden, {}
    positions = torch.arange(seq).expand(2, seq)
    return hidden, {"position_embeddings": model.model.rotary_emb(hidden, positions)}


def _by_hand(layer, hidden, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """max|k|, max|v| from the attention's own modules: k_proj, k_norm if any, RoPE."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    norm = getattr(layer, "input_layernorm", None) or layer.self_attn_layer_norm
    x = norm(hidden)
    shape = (*x.shape[:-1], -1, attn.head_dim)
    k, v = attn.k_proj(x).view(shape), attn.v_proj(x).view(shape)
    if hasattr(attn, "k_norm"):
        k = attn.k_norm(k)
    k, v = k.transpose(1, 2), v.transpose(1, 2)
    if "position_embeddings" in kwargs:
        cos, sin = kwargs["position_embeddings"]
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
    return k.abs().amax(), v.abs().amax()


def _hook_state(module: torch.nn.Module) -> list:
    """Every hook dict and submodule name of `module`, to compare before / after."""
    return [(name, len(m._forward_pre_hooks), len(m._forward_hooks), sorted(m._modules))
            for name, m in module.named_modules()]


def _out(layer, hidden, kwargs):
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("kind", ["llama", "qwen3", "mistral", "opt"])
@torch.no_grad()
def test_maxima_equal_the_states_computed_by_hand(kind):
    from raycompress.engine.kv import KVObserver

    model = _model(kind)
    layer = model.model.decoder.layers[0] if kind == "opt" else model.model.layers[0]
    hidden, kwargs = _layer_inputs(model)
    k_ref, v_ref = _by_hand(layer, hidden, kwargs)
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def global_state():
        return sorted(ALL_ATTENTION_FUNCTIONS), sorted(ALL_MASK_ATTENTION_FUNCTIONS), model.config._attn_implementation

    plain, before, registered = _out(layer, hidden, kwargs), _hook_state(layer), global_state()
    with KVObserver(layer.self_attn) as obs:
        assert obs.k_absmax is None and obs.v_absmax is None
        observed = _out(layer, hidden, kwargs)
    assert torch.equal(observed, plain)  # the layer's output is unchanged
    assert obs.k_absmax.dtype == torch.float32 and obs.k_absmax.dim() == 0
    assert torch.equal(obs.k_absmax, k_ref) and torch.equal(obs.v_absmax, v_ref)
    assert _hook_state(layer) == before and not hasattr(layer.self_attn, "kv_cache")
    assert global_state() == registered
    assert torch.equal(_out(layer, hidden, kwargs), plain)


@torch.no_grad()
def test_running_maximum_over_calls_and_the_fp8_scale_compressed_tensors_gives():
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils import calculate_qparams

    from raycompress.engine.kv import KVObserver

    model = _model("qwen3")
    layer = model.model.layers[0]
    batches = [_layer_inputs(model, seq=s, seed=s) for s in (5, 9, 3)]
    with KVObserver(layer.self_attn) as obs:
        for hidden, kwargs in batches:
            _out(layer, hidden, kwargs)
    k_max = torch.stack([_by_hand(layer, h, kw)[0] for h, kw in batches]).amax()
    assert torch.equal(obs.k_absmax, k_max)
    kv_args = QuantizationArgs(num_bits=8, type="float", strategy="tensor", symmetric=True, dynamic=False)
    scale, _ = calculate_qparams(-obs.k_absmax.reshape(1), obs.k_absmax.reshape(1), kv_args)
    assert torch.equal(scale, (obs.k_absmax / torch.finfo(torch.float8_e4m3fn).max).reshape(1))


@torch.no_grad()
def test_whole_model_with_a_real_cache_and_only_the_observed_module():
    """Through the model's forward (a DynamicCache): the cache still fills, the logits are unchanged,
    and only the observed layer's attention is observed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from raycompress.engine.kv import KVObserver

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**SMALL, "num_hidden_layers": 2})).eval()
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    plain = model(ids).logits
    with KVObserver(model.model.layers[1].self_attn) as obs:
        out = model(ids, use_cache=True)
    keys = out.past_key_values.layers[1].keys
    assert torch.equal(out.logits, plain) and out.past_key_values.get_seq_length() == 6
    assert torch.equal(obs.k_absmax, keys.abs().amax())
    assert torch.equal(obs.v_absmax, out.past_key_values.layers[1].values.abs().amax())
    assert not hasattr(model.model.layers[0].self_attn, "kv_cache")


@torch.no_grad()
def test_a_compression_workers_layer(tiny_llama_dir):
    """The worker's own layer and captured kwargs (position_embeddings, mask): every micro-batch
    counts, the maxima equal the hand computation over the whole shard."""
    from raycompress.engine.kv import KVObserver
    from raycompress.engine.worker import LayerWorker

    ids = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(0))
    worker = LayerWorker(str(tiny_llama_dir), ids, micro_batch=4)
    worker.begin_layer(0)
    with KVObserver(worker.layer.self_attn) as obs:
        worker._run_all(keep=False)
    per_batch = [_by_hand(worker.layer, worker.hidden[i : i + 4], kw) for i, kw in zip((0, 4), worker._kwargs)]
    assert torch.equal(obs.k_absmax, torch.stack([k for k, _ in per_batch]).amax())
    assert torch.equal(obs.v_absmax, torch.stack([v for _, v in per_batch]).amax())
