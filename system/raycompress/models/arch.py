"""Architecture facts as data, keyed by `config.architectures[0]`.

Everything the engine needs to know about a model family lives in one `ArchSpec` row: where the
decoder layers are, the embedding and final-norm prefixes, the rotary module, which linears in a
decoder layer share an input (so one Hessian serves them), and the MLP projections whose
intermediate dimension structured pruning shrinks. A mixture-of-experts family adds a `MoESpec`
row: where the router, the fused experts and the shared expert are, how the checkpoint names the
experts, and which modules are never compressed. No code tests a model's name.
"""
from __future__ import annotations

from dataclasses import dataclass

from raycompress.models.validate import CheckpointError


class UnsupportedArchitectureError(CheckpointError):
    """The checkpoint's `config.architectures` (or `model_type`) is not in the table."""


@dataclass(frozen=True)
class MoESpec:
    """A decoder layer's sparse mixture-of-experts block, as data.

    Paths are relative to the decoder layer. The live module (transformers >= 5) holds the experts
    fused: `{experts}.{gate_up}` is (E, 2*I, H), rows [0, I) the gate projection and [I, 2*I) the up
    projection of each expert, `{experts}.{down}` is (E, H, I); the block computes, per token t
    routed to expert e with router weight w: w * down_e(act(gate_e x_t) * up_e x_t). Checkpoints on
    the Hub name every expert's linears separately (`checkpoint_experts`, `{e}` the expert index,
    after `checkpoint_renames` of the layer-relative prefix); transformers converts them at load
    time (its conversion_mapping.py) and writes them back per expert on `save_pretrained`.
    """

    block: str  # the sparse MoE block module (a layer whose block has no `experts` is a dense-MLP layer)
    router: str  # the router: weight (E, H); forward(x (N, H)) -> (logits, top_k_weights, top_k_index)
    experts: str  # the fused experts module
    num_experts_key: str  # config key: number of routed experts E
    intermediate_key: str  # config key: each routed expert's intermediate size I
    # expert role ("gate", "up", "down") -> checkpoint tensor name under the layer prefix, with {e}
    checkpoint_experts: tuple[tuple[str, str], ...]
    checkpoint_renames: tuple[tuple[str, str], ...] = ()  # (checkpoint prefix, live prefix), e.g. the block
    gate_up: str = "gate_up_proj"  # fused parameter of `experts`: (E, 2*I, H), gate rows first
    down: str = "down_proj"  # fused parameter of `experts`: (E, H, I)
    top_k_key: str = "num_experts_per_tok"
    # each expert's linears grouped by shared input: gate/up see the routed tokens, down sees act(gate)*up
    expert_groups: tuple[tuple[str, ...], ...] = (("gate", "up"), ("down",))
    shared_expert: str | None = None  # an MLP every token goes through (nn.Linear modules), if any
    shared_groups: tuple[tuple[str, ...], ...] = ()  # its linears, grouped by shared input
    shared_gate: str | None = None  # the shared expert's scalar gate (nn.Linear H -> 1), if any
    never_compress: tuple[str, ...] = ()  # modules left dense by default (routers, shared-expert gates)
    dense_groups: tuple[tuple[str, ...], ...] = ()  # the MLP's linears in a layer whose block is dense

    def path(self, rel: str) -> str:
        """Layer-relative dotted path of `rel` (relative to the block)."""
        return f"{self.block}.{rel}"


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
    moe: MoESpec | None = None  # the mixture-of-experts block; `input_groups` then lists the dense linears only

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

_QWEN_EXPERTS = tuple((role, f"mlp.experts.{{e}}.{role}_proj.weight") for role in ("gate", "up", "down"))
_QWEN_DENSE_MLP = (("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))  # mlp_only_layers / decoder_sparse_step
_ATTENTION_ONLY = dict(
    layers="model.layers", embed=("model.embed_tokens",), final=("model.norm", "lm_head"), rotary="model.rotary_emb",
    input_groups=_LLAMA_LIKE.input_groups[:2], norm_before=_LLAMA_LIKE.norm_before[:1],
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
    "Qwen3MoeForCausalLM": ArchSpec(**_ATTENTION_ONLY, moe=MoESpec(
        block="mlp", router="gate", experts="experts", num_experts_key="num_experts",
        intermediate_key="moe_intermediate_size", checkpoint_experts=_QWEN_EXPERTS,
        never_compress=("mlp.gate",), dense_groups=_QWEN_DENSE_MLP,
    )),
    "MixtralForCausalLM": ArchSpec(**_ATTENTION_ONLY, moe=MoESpec(
        block="mlp", router="gate", experts="experts", num_experts_key="num_local_experts",
        intermediate_key="intermediate_size",
        checkpoint_experts=(("gate", "block_sparse_moe.experts.{e}.w1.weight"),
                            ("up", "block_sparse_moe.experts.{e}.w3.weight"),
                            ("down", "block_sparse_moe.experts.{e}.w2.weight")),
        checkpoint_renames=(("block_sparse_moe.", "mlp."),), never_compress=("mlp.gate",),
    )),
    "Qwen2MoeForCausalLM": ArchSpec(**_ATTENTION_ONLY, moe=MoESpec(
        block="mlp", router="gate", experts="experts", num_experts_key="num_experts",
        intermediate_key="moe_intermediate_size", checkpoint_experts=_QWEN_EXPERTS,
        shared_expert="shared_expert", shared_gate="shared_expert_gate",
        shared_groups=(("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"), ("mlp.shared_expert.down_proj",)),
        never_compress=("mlp.gate", "mlp.shared_expert_gate"), dense_groups=_QWEN_DENSE_MLP,
    )),
}

# config.json `model_type` -> the class transformers' AutoModelForCausalLM builds for it; the
# skeleton is built from the model type, so it must agree with `architectures`
MODEL_TYPES: dict[str, str] = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "opt": "OPTForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
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
