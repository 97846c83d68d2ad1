"""Architecture facts as data, keyed by `config.architectures[0]`.

Everything the engine needs to know about a model family lives in one `ArchSpec` row: where the
decoder layers are, the embedding and final-norm prefixes, the rotary module, which linears in a
decoder layer share an input (so one Hessian serves them), and the MLP projections whose
intermediate dimension structured pruning shrinks. No code tests a model's name.
"""
from __future__ import annotations

from dataclasses import dataclass

from raycompress.models.validate import CheckpointError


class UnsupportedArchitectureError(CheckpointError):
    """The checkpoint's `config.architectures` (or `model_type`) is not in the table."""


@dataclass(frozen=True)
class ArchSpec:
    layers: str  # dotted path of the decoder-layer ModuleList in the *ForCausalLM model
    embed: tuple[str, ...]  # modules run once before layer 0 (state-dict prefixes)
    final: tuple[str, ...]  # modules after the last layer (final norm, lm_head)
    rotary: str | None  # dotted path of the rotary-embedding module, None if positions are learned
    # linears inside one decoder layer, grouped by shared input (one Hessian per group)
    input_groups: tuple[tuple[str, ...], ...]
    mlp_up: tuple[str, ...] = ()  # linears whose *output* rows are FFN neurons
    mlp_down: str | None = None  # linear whose *input* columns are FFN neurons
    intermediate_key: str = "intermediate_size"
    # input group (its first linear) -> the norm module whose output is that group's input: the
    # place SmoothQuant and AWQ fold their per-channel scales into (groups not listed are not smoothed)
    norm_before: tuple[tuple[str, str], ...] = ()
    attention: str = "self_attn"  # the attention module (where a KV cache's k_scale / v_scale live)

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.input_groups for name in group)


_LLAMA_LIKE = ArchSpec(
    layers="model.layers",
    embed=("model.embed_tokens",),
    final=("model.norm", "lm_head"),
    rotary="model.rotary_emb",
    input_groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    mlp_up=("mlp.gate_proj", "mlp.up_proj"),
    mlp_down="mlp.down_proj",
    norm_before=(("self_attn.q_proj", "input_layernorm"), ("mlp.gate_proj", "post_attention_layernorm")),
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": _LLAMA_LIKE,
    "MistralForCausalLM": _LLAMA_LIKE,
    "Qwen2ForCausalLM": _LLAMA_LIKE,
    "Qwen3ForCausalLM": _LLAMA_LIKE,
    "OPTForCausalLM": ArchSpec(
        layers="model.decoder.layers",
        embed=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
        final=("model.decoder.final_layer_norm", "lm_head"),
        rotary=None,
        input_groups=(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
        mlp_up=("fc1",),
        mlp_down="fc2",
        intermediate_key="ffn_dim",
        norm_before=(("self_attn.q_proj", "self_attn_layer_norm"), ("fc1", "final_layer_norm")),
    ),
}

# config.json `model_type` -> the class transformers' AutoModelForCausalLM builds for it; the
# skeleton is built from the model type, so it must agree with `architectures`
MODEL_TYPES: dict[str, str] = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "opt": "OPTForCausalLM",
}


def arch_spec(config) -> ArchSpec:
    """The table row for a transformers `PretrainedConfig`.

    Raises:
        UnsupportedArchitectureError: `config.architectures` is missing or names no supported
            family; the message lists the supported ones.
    """
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise UnsupportedArchitectureError(
        f"unsupported architecture {names or '<config.architectures missing>'}; "
        f"supported: {sorted(ARCHITECTURES)}"
    )
