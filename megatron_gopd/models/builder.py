"""Megatron `TransformerConfig`, layer spec and `GPTModel` for a `ModelArchitecture`.

The student uses Megatron's global parallel state; a teacher or reference with its own layout passes
its own `ProcessGroupCollection` (and its own sizes in `ParallelLayout`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from megatron_gopd import platform
from megatron_gopd.models.architecture import ModelArchitecture
from megatron_gopd.models.norm import SequenceParallelRMSNorm

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class ParallelLayout:
    """How one model is split over the ranks of the job."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: Optional[int] = None
    """Expert tensor-parallel size; defaults to `tp`."""
    sequence_parallel: bool = False

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp


@dataclasses.dataclass
class ModelConfig:
    """A model checkpoint and the layout it runs at: the shape shared by the student, the teachers
    and the references of a job (each may use its own sizes)."""

    checkpoint: str = ""
    """A converted Megatron checkpoint (``gopd-convert hf-to-mcore`` output, with ``hf/`` inside);
    loadable at any layout, whatever layout it was saved from."""
    tp: int = 1
    """Tensor-parallel size of this model."""
    pp: int = 1
    """Pipeline-parallel size of this model; ``tp * pp`` must divide the world."""
    ep: int = 1
    """Expert-parallel size (MoE models); carved out of this model's data parallelism."""
    dtype: Optional[str] = None
    """``float32`` / ``bfloat16`` / ``float16``; None: the dtype the checkpoint was converted in."""
    attention: Literal["auto", "sdpa", "local"] = "auto"
    """Core attention: ``auto`` (Transformer Engine's where it imports, else torch's
    scaled_dot_product_attention), ``sdpa``, or ``local`` (megatron-core's DotProductAttention:
    materialises [b, heads, s, s] scores and cannot take packed micro-batches; for comparisons)."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "ep"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dtype is not None:
            torch_dtype(self.dtype)  # raises naming the supported dtypes
        if self.attention not in ("auto", "sdpa", "local"):
            raise ValueError(f"attention must be 'auto', 'sdpa' or 'local', got {self.attention!r}")

    @property
    def layout(self) -> ParallelLayout:
        """The model's `ParallelLayout`."""
        return ParallelLayout(tp=self.tp, pp=self.pp, ep=self.ep)


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; clear error for anything else."""
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; choose one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def transformer_config(
    arch: ModelArchitecture,
    layout: ParallelLayout,
    *,
    dtype: str = "float32",
    recompute: bool = False,
    perform_initialization: bool = True,
    calculate_per_token_loss: bool = False,
):
    """The Megatron `TransformerConfig` that reproduces `arch` exactly on `layout`.

    Dropout is always 0 (distillation log-probs must match between scoring and training). Fused
    kernels are enabled only where Transformer Engine provides them.
    """
    from megatron.core.transformer import TransformerConfig

    arch.validate_parallel(layout.tp, layout.pp, layout.ep, layout.etp)
    params_dtype = torch_dtype(dtype)
    fused = platform.have_transformer_engine()
    moe_kwargs = {}
    if arch.is_moe:
        moe_kwargs = dict(
            num_moe_experts=arch.num_experts,
            moe_router_topk=arch.moe_router_topk,
            moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
            # Qwen3-MoE: softmax over all experts, take top-k, renormalise when norm_topk_prob.
            # Megatron's "softmax after top-k" is exactly the renormalised top-k.
            moe_router_score_function="softmax",
            moe_router_pre_softmax=not arch.moe_norm_topk_prob,
            moe_router_load_balancing_type="aux_loss" if arch.moe_aux_loss_coeff > 0 else "none",
            moe_aux_loss_coeff=arch.moe_aux_loss_coeff,
            moe_router_dtype="fp32",
            moe_token_dispatcher_type="alltoall",
            moe_grouped_gemm=fused,
            # Dropless routing: a teacher's log-probs must not depend on what else is in the batch.
            moe_expert_capacity_factor=None,
        )
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.kv_channels,
        layernorm_epsilon=arch.norm_epsilon,
        normalization="RMSNorm",
        qk_layernorm=arch.qk_layernorm,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=arch.init_std,
        apply_query_key_layer_scaling=False,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.expert_tp,
        # Megatron refuses to train MoE layers under TP without sequence parallelism.
        sequence_parallel=layout.tp > 1 and (layout.sequence_parallel or arch.is_moe),
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,
        # CPU initialisation draws the full weight and slices it, so every TP layout starts from the
        # same numbers; on GPU the (faster) on-device initialisation is used.
        use_cpu_initialization=platform.cpu_mode(),
        perform_initialization=perform_initialization,
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=fused,
        bias_activation_fusion=fused,
        bias_dropout_fusion=fused,
        apply_rope_fusion=fused,
        persist_layer_norm=fused,
        recompute_granularity="full" if recompute else None,
        recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None,
        calculate_per_token_loss=calculate_per_token_loss,
        **moe_kwargs,
    )


def layer_spec(arch: ModelArchitecture, layers_per_stage: int, *, attention: str = "auto"):
    """The decoder spec for one pipeline stage of `arch`.

    Transformer Engine's layer spec when TE imports (GPU); otherwise Megatron's local spec with every
    norm (input, pre-MLP, q/k and final) swapped for `SequenceParallelRMSNorm`, the one local norm
    that allows sequence parallelism.

    `attention` picks the core attention (one of `ATTENTION_BACKENDS`): ``auto`` keeps TE's own
    where TE imports and uses `SDPAttention` otherwise; ``sdpa`` / ``local`` put `SDPAttention` /
    megatron-core's `DotProductAttention` (the [b, heads, s, s] scores; no packing) into whichever
    spec is in use.
    """
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from megatron_gopd.models.attention import ATTENTION_BACKENDS

    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"attention={attention!r} is not supported; choose one of {list(ATTENTION_BACKENDS)}")
    num_experts = arch.num_experts if arch.is_moe else None
    if platform.have_transformer_engine():
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=arch.is_moe, qk_layernorm=arch.qk_layernorm
        )
        if attention != "auto":
            _set_core_attention(spec, attention)
        return spec
    spec = gpt_layer_specs.get_gpt_layer_local_spec(
        num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=arch.qk_layernorm, normalization="RMSNorm"
    )
    _replace_norms(spec)
    _set_core_attention(spec, "sdpa" if attention == "auto" else attention)
    return TransformerBlockSubmodules(layer_specs=[spec] * layers_per_stage, layer_norm=SequenceParallelRMSNorm)


def _set_core_attention(spec, attention: str) -> None:
    """Put the core attention named by `attention` (``sdpa`` / ``local``) into a layer spec."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_gopd.models.attention import SDPAttention

    core = SDPAttention if attention == "sdpa" else DotProductAttention
    spec.submodules.self_attention.submodules.core_attention = core


def _replace_norms(spec) -> None:
    """Swap megatron-core's torch-norm wrapper for `SequenceParallelRMSNorm` throughout a spec."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    submodules = getattr(spec, "submodules", None)
    if submodules is None or not dataclasses.is_dataclass(submodules):
        return
    for field in dataclasses.fields(submodules):
        value = getattr(submodules, field.name)
        if value is WrappedTorchNorm:
            setattr(submodules, field.name, SequenceParallelRMSNorm)
        else:
            _replace_norms(value)


def build_gpt_model(
    arch: ModelArchitecture,
    layout: ParallelLayout,
    *,
    dtype: str = "float32",
    pg_collection=None,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    perform_initialization: bool = True,
    recompute: bool = False,
    calculate_per_token_loss: bool = False,
    attention: str = "auto",
):
    """Build this rank's pipeline stage of `arch` as a Megatron `GPTModel` on `platform.device()`.

    `pg_collection` gives the model its own process groups (a teacher laid out differently from the
    student); without it Megatron's global parallel state is used. The output layer returns
    vocab-parallel logits ``[s, b, padded_vocab / tp]`` (``parallel_output=True``). `attention`
    picks the core attention (see `layer_spec`).
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    config = transformer_config(
        arch,
        layout,
        dtype=dtype,
        recompute=recompute,
        perform_initialization=perform_initialization,
        calculate_per_token_loss=calculate_per_token_loss,
    )
    if pg_collection is not None:
        pp_group = pg_collection.pp
        stage, stages = pp_group.rank(), pp_group.size()
    else:
        stage = parallel_state.get_pipeline_model_parallel_rank()
        stages = parallel_state.get_pipeline_model_parallel_world_size()
    if stages != layout.pp:
        raise ValueError(
            f"the process groups have {stages} pipeline stages but the layout asks for pipeline_parallel={layout.pp}"
        )
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(arch, arch.num_layers // layout.pp, attention=attention),
        vocab_size=arch.padded_vocab_size(layout.tp),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=stage == 0 if pre_process is None else pre_process,
        post_process=stage == stages - 1 if post_process is None else post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta),
        rope_scaling=arch.rope_scaling_factor is not None,
        rope_scaling_factor=arch.rope_scaling_factor or 8.0,
        pg_collection=pg_collection,
    )
    return model.to(platform.device())
