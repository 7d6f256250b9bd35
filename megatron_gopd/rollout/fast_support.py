"""Which students the fast rollout engine can serve, and why not the others."""

from __future__ import annotations

from typing import Optional

from megatron_gopd.models import ModelArchitecture, ParallelLayout


def fast_engine_unsupported_reason(
    model=None, arch: Optional[ModelArchitecture] = None, layout: Optional[ParallelLayout] = None
) -> Optional[str]:
    """Why the fast engine cannot run this student, or None when it can.

    Any of the three may be given: `arch` and `layout` answer before a model is built (a trainer
    choosing its engine from its config), `model` checks the built model itself (its layer spec,
    process groups and config). Supported: a dense Qwen3 / Llama-style GPTModel with Megatron's
    local (non-Transformer-Engine) layer spec, one pipeline stage, no sequence or context
    parallelism, at any TP size that divides the key/value heads.
    """
    if arch is not None:
        if arch.is_moe:
            return (
                f"the student is a mixture-of-experts model ({arch.hf_architecture}); only dense models are supported"
            )
    if layout is not None:
        if layout.pp > 1:
            return f"pipeline parallelism (PP={layout.pp}) is not supported"
        if layout.sequence_parallel and layout.tp > 1:
            return "sequence parallelism is not supported"
        if arch is not None and arch.num_query_groups % layout.tp:
            return (
                f"TP={layout.tp} does not divide the {arch.num_query_groups} key/value heads (Megatron would "
                "split a KV head over ranks)"
            )
    if model is not None:
        return _model_reason(model)
    return None


def _model_reason(model) -> Optional[str]:
    """The checks that need the built model (this rank's chunk)."""
    if isinstance(model, (list, tuple)):
        return "virtual pipeline stages (a list of model chunks) are not supported"
    from megatron.core.utils import get_attr_wrapped_model

    try:
        gpt = get_attr_wrapped_model(model, "decoder", return_model_obj=True)
    except RuntimeError:
        return f"{type(model).__name__} is not a Megatron GPTModel"
    config = gpt.config
    if getattr(config, "num_moe_experts", None):
        return f"the student has {config.num_moe_experts} experts per layer; only dense models are supported"
    if gpt.pg_collection.pp.size() > 1:
        return f"pipeline parallelism (PP={gpt.pg_collection.pp.size()}) is not supported"
    if config.sequence_parallel:
        return "sequence parallelism is not supported"
    if getattr(config, "context_parallel_size", 1) > 1:
        return f"context parallelism (CP={config.context_parallel_size}) is not supported"
    tp = gpt.pg_collection.tp.size()
    if config.num_query_groups % tp:
        return f"TP={tp} does not divide the {config.num_query_groups} key/value heads"
    numerics = {
        "normalization": (config.normalization, "RMSNorm"),
        "gated_linear_unit": (config.gated_linear_unit, True),
        "add_bias_linear": (config.add_bias_linear, False),
        "add_qkv_bias": (config.add_qkv_bias, False),
        "rotary_interleaved": (config.rotary_interleaved, False),
        "position_embedding_type": (gpt.position_embedding_type, "rope"),
    }
    for name, (value, wanted) in numerics.items():
        if value != wanted:
            return f"{name}={value!r} is not supported (the fast forward implements {wanted!r})"
    if getattr(config.activation_func, "__name__", "") != "silu":
        activation = getattr(config.activation_func, "__name__", config.activation_func)
        return f"activation {activation} is not supported (silu only)"
    if getattr(gpt.rotary_pos_emb, "seq_len_interpolation_factor", None) is not None:
        return "RoPE sequence-length interpolation is not supported"
    return _layer_spec_reason(gpt)


def _layer_spec_reason(gpt) -> Optional[str]:
    """None when every layer is the local spec the fast forward reads (else: which module is not)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_gopd.models.attention import SDPAttention

    for index, layer in enumerate(gpt.decoder.layers):
        attention = getattr(layer, "self_attention", None)
        mlp = getattr(layer, "mlp", None)
        parts = {
            "self_attention.linear_qkv": (getattr(attention, "linear_qkv", None), ColumnParallelLinear),
            "self_attention.linear_proj": (getattr(attention, "linear_proj", None), RowParallelLinear),
            # the fast forward computes attention itself: either of the local spec's core modules
            "self_attention.core_attention": (
                getattr(attention, "core_attention", None),
                (DotProductAttention, SDPAttention),
            ),
            "mlp.linear_fc1": (getattr(mlp, "linear_fc1", None), ColumnParallelLinear),
            "mlp.linear_fc2": (getattr(mlp, "linear_fc2", None), RowParallelLinear),
        }
        for name, (module, kinds) in parts.items():
            kinds = kinds if isinstance(kinds, tuple) else (kinds,)
            if type(module) not in kinds:
                expected = " or ".join(k.__name__ for k in kinds)
                return (
                    f"layer {index} {name} is {type(module).__name__}, not the local spec's {expected} "
                    "(Transformer Engine layer spec?); only the local spec is supported"
                )
        for name in ("input_layernorm", "pre_mlp_layernorm"):
            if getattr(getattr(layer, name, None), "eps", None) is None:
                return f"layer {index} {name} is not an RMSNorm module of the local spec"
    return None
