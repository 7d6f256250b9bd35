"""Helpers for multi-process tests on tiny Megatron models: shapes, a PP-aware forward, gathers."""

from __future__ import annotations

from typing import Any, Optional

import torch

from megatron_gopd.models import ModelArchitecture

TINY_QWEN3: dict[str, Any] = dict(
    architectures=["Qwen3ForCausalLM"],
    model_type="qwen3",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    vocab_size=300,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    hidden_act="silu",
)
TINY_QWEN3_MOE: dict[str, Any] = dict(
    TINY_QWEN3,
    architectures=["Qwen3MoeForCausalLM"],
    model_type="qwen3_moe",
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    norm_topk_prob=True,
    tie_word_embeddings=False,
)


def tiny_arch(hf: Optional[dict] = None, **overrides: Any) -> ModelArchitecture:
    return ModelArchitecture.from_hf_config({**(hf or TINY_QWEN3), **overrides}, source="<test>")


def forward_logits(
    model, tokens: torch.Tensor, vocab_size: int, *, with_backward: bool = False
) -> tuple[Optional[torch.Tensor], Optional[float]]:
    """Run `tokens` ``[b, s]`` through a (possibly pipelined) model with Megatron's schedule.

    Returns the logits of the real vocabulary ``[b, s, vocab_size]`` (padding rows dropped) and the
    mean logit-sum "loss" on the last pipeline stage, ``(None, None)`` elsewhere. With
    `with_backward` the loss is back-propagated.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    batch, seq = tokens.shape
    positions = torch.arange(seq).unsqueeze(0).expand(batch, -1)
    collected: dict[str, torch.Tensor] = {}

    def loss_func(output: torch.Tensor):
        full = gather_from_tensor_model_parallel_region(output)[..., :vocab_size]  # [b, s, V]
        collected["logits"] = full.detach()
        # A smooth scalar that touches every logit (deterministic, unlike a sampled loss).
        loss = full.float().log_softmax(-1)[..., :50].mean()
        return loss, {"loss": loss.detach()}

    def forward_step(data_iterator, model):
        return model(tokens, positions, None), loss_func

    forward_backward = get_forward_backward_func()
    losses = forward_backward(
        forward_step_func=forward_step,
        data_iterator=iter([None]),
        model=[model],
        num_microbatches=1,
        seq_length=seq,
        micro_batch_size=batch,
        forward_only=not with_backward,
    )
    if with_backward:
        _allreduce_sequence_parallel_grads(model)
    if not parallel_state.is_pipeline_last_stage():
        return None, None
    return collected["logits"], float(losses[0]["loss"])


def _allreduce_sequence_parallel_grads(model) -> None:
    """What Megatron's finalize_model_grads does for norms under sequence parallelism."""
    from megatron.core import parallel_state

    if not model.config.sequence_parallel:
        return
    for param in model.parameters():
        if getattr(param, "sequence_parallel", False) and param.grad is not None:
            torch.distributed.all_reduce(param.grad, group=parallel_state.get_tensor_model_parallel_group())
