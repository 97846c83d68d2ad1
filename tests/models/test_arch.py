"""models.arch: the architecture table."""
import pytest
from transformers import LlamaConfig

from raycompress.models.arch import ARCHITECTURES, UnsupportedArchitectureError, arch_spec


def test_llama_spec():
    cfg = LlamaConfig(architectures=["LlamaForCausalLM"])
    spec = arch_spec(cfg)
    assert spec.layers == "model.layers"
    assert spec.linears == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    assert len(spec.input_groups) == 4


def test_unknown_architecture_lists_supported():
    cfg = LlamaConfig(architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnsupportedArchitectureError) as ei:
        arch_spec(cfg)
    msg = str(ei.value)
    assert "GPT2LMHeadModel" in msg
    for name in ARCHITECTURES:
        assert name in msg
    assert isinstance(ei.value, ValueError)


def test_missing_architectures():
    cfg = LlamaConfig()
    cfg.architectures = None
    with pytest.raises(UnsupportedArchitectureError, match="missing"):
        arch_spec(cfg)


def test_model_types_agree_with_transformers_and_cover_the_table():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from raycompress.models.arch import MODEL_TYPES

    assert set(MODEL_TYPES.values()) == set(ARCHITECTURES)
    assert all(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[t] == cls for t, cls in MODEL_TYPES.items())
