"""HF config.json -> ModelArchitecture -> Megatron TransformerConfig, and the errors on the way."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, Qwen3Config, Qwen3MoeConfig

from megatron_gopd.models import ModelArchitecture, ParallelLayout, UnsupportedModelError, transformer_config

SMALL = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def _saved(tmp_path, hf_config) -> ModelArchitecture:
    hf_config.architectures = [type(hf_config).__name__.replace("Config", "ForCausalLM")]
    hf_config.save_pretrained(tmp_path)
    return ModelArchitecture.from_pretrained(tmp_path)


def test_qwen3_from_transformers_config(tmp_path):
    arch = _saved(tmp_path, Qwen3Config(**SMALL, head_dim=32, tie_word_embeddings=True, rope_theta=1e6))
    assert arch.family == "qwen3" and arch.hf_architecture == "Qwen3ForCausalLM"
    assert arch.kv_channels == 32 != arch.hidden_size // arch.num_attention_heads  # Qwen3's decoupled head_dim
    assert arch.num_query_groups == 2 and arch.qk_layernorm and arch.tie_word_embeddings
    assert arch.rope_theta == 1e6 and arch.rope_scaling_factor is None
    assert arch.padded_vocab_size(1) == 384 and arch.padded_vocab_size(2) == 512


def test_qwen3_moe_routing_fields(tmp_path):
    arch = _saved(
        tmp_path,
        Qwen3MoeConfig(
            **SMALL, head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True
        ),
    )
    assert arch.is_moe and arch.num_experts == 8 and arch.moe_router_topk == 2
    cfg = transformer_config(arch, ParallelLayout())
    assert cfg.num_moe_experts == 8 and cfg.moe_ffn_hidden_size == 32
    # normalised top-k probabilities == softmax over the selected logits (softmax after top-k)
    assert cfg.moe_router_pre_softmax is False and cfg.moe_router_score_function == "softmax"
    assert cfg.moe_expert_capacity_factor is None  # dropless
    unnormalised = ModelArchitecture.from_hf_config(
        {**json.loads((tmp_path / "config.json").read_text()), "norm_topk_prob": False}
    )
    assert transformer_config(unnormalised, ParallelLayout()).moe_router_pre_softmax is True


def test_llama3_rope_scaling(tmp_path):
    scaling = dict(
        rope_type="llama3",
        factor=32.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )
    arch = _saved(tmp_path, LlamaConfig(**SMALL, rope_scaling=scaling, rope_theta=5e5, max_position_embeddings=16384))
    assert arch.family == "llama" and not arch.qk_layernorm
    assert arch.rope_scaling_factor == 32.0 and arch.rope_theta == 5e5 and arch.kv_channels == 16


def test_transformer_config_matches_architecture():
    arch = ModelArchitecture.from_hf_config(dict(architectures=["Qwen3ForCausalLM"], **SMALL, head_dim=32))
    cfg = transformer_config(arch, ParallelLayout(tp=2, pp=2), dtype="bfloat16")
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size) == (4, 64, 128)
    assert (cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels) == (4, 2, 32)
    assert cfg.normalization == "RMSNorm" and cfg.gated_linear_unit and not cfg.add_bias_linear
    assert cfg.hidden_dropout == 0.0 and cfg.attention_dropout == 0.0
    assert cfg.params_dtype == torch.bfloat16 and cfg.bf16
    assert cfg.tensor_model_parallel_size == 2 and cfg.pipeline_model_parallel_size == 2


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("hidden_act", "gelu", "hidden_act='gelu' is not supported"),
        ("attention_bias", True, "attention_bias=true"),
        ("use_sliding_window", True, "use_sliding_window=true"),
        ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope type 'yarn'"),
        ("layer_types", ["full_attention", "sliding_attention"], "layer_types"),
    ],
)
def test_unsupported_fields_are_named(field, value, message):
    hf = dict(architectures=["Qwen3ForCausalLM"], **SMALL, **{field: value})
    with pytest.raises(UnsupportedModelError, match=message.replace("[", r"\[").replace("(", r"\(")):
        ModelArchitecture.from_hf_config(hf)


def test_unsupported_architecture_and_missing_fields():
    with pytest.raises(UnsupportedModelError, match="MistralForCausalLM.*supported: Qwen3ForCausalLM"):
        ModelArchitecture.from_hf_config(dict(architectures=["MistralForCausalLM"], **SMALL))
    hf = dict(architectures=["Qwen3ForCausalLM"], **SMALL)
    del hf["num_hidden_layers"]
    with pytest.raises(UnsupportedModelError, match="'num_hidden_layers' is missing"):
        ModelArchitecture.from_hf_config(hf)
    moe = dict(
        architectures=["Qwen3MoeForCausalLM"],
        **SMALL,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        mlp_only_layers=[0],
    )
    with pytest.raises(UnsupportedModelError, match="mlp_only_layers"):
        ModelArchitecture.from_hf_config(moe)


def test_missing_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ModelArchitecture.from_pretrained(tmp_path)


def test_bad_model_config_rejected_before_any_model_is_built(tmp_path, monkeypatch):
    """A bad config.json fails in parsing; Megatron's GPTModel is never constructed."""
    from megatron.core.models.gpt import gpt_model

    constructed = []
    monkeypatch.setattr(gpt_model.GPTModel, "__init__", lambda *a, **k: constructed.append(1))
    (tmp_path / "config.json").write_text(
        json.dumps(dict(architectures=["Qwen3ForCausalLM"], **SMALL, hidden_act="relu"))
    )
    from megatron_gopd.models import build_gpt_model

    with pytest.raises(UnsupportedModelError, match="hidden_act='relu'"):
        build_gpt_model(ModelArchitecture.from_pretrained(tmp_path), ParallelLayout())
    assert constructed == []


@pytest.mark.parametrize(
    "layout, message",
    [
        (dict(tp=3), "num_attention_heads=4 is not divisible by tensor_parallel=3"),
        (dict(tp=4), "num_key_value_heads=2 is not divisible by tensor_parallel=4"),
        (dict(pp=3), "num_hidden_layers=4 is not divisible by pipeline_parallel=3"),
        (dict(ep=2), "expert_parallel=2 but the model has no experts"),
        (dict(tp=0), "tensor_parallel must be >= 1"),
    ],
)
def test_parallel_sizes_checked_against_shapes(layout, message):
    arch = ModelArchitecture.from_hf_config(dict(architectures=["Qwen3ForCausalLM"], **SMALL))
    with pytest.raises(ValueError, match=message):
        arch.validate_parallel(**layout)


def test_experts_not_divisible_by_ep():
    arch = ModelArchitecture.from_hf_config(
        dict(
            architectures=["Qwen3MoeForCausalLM"],
            **SMALL,
            num_experts=6,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
        )
    )
    with pytest.raises(ValueError, match="num_experts=6 is not divisible by expert_parallel=4"):
        arch.validate_parallel(ep=4)
