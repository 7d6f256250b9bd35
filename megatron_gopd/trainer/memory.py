"""The memory plan of a `TrainConfig`: its models, layouts and lengths handed to `megatron_gopd.planner`."""

from __future__ import annotations

from typing import Optional

from megatron_gopd.planner import (
    CPU_PROCESS_OVERHEAD_GB,
    GB,
    MemoryPlan,
    PlannedModel,
    dense_dtype,
    load_architecture,
    plan_memory,
)
from megatron_gopd.rollout.kv_slots import DEFAULT_CPU_KV_CACHE_GB
from megatron_gopd.scoring.plan import planned_models
from megatron_gopd.trainer.config import TrainConfig

ASSUMED_PROMPT_TOKENS = 1024
"""Prompt length assumed by the plan when ``data.max_prompt_length`` is not set."""


def attention_kind() -> str:
    """How the layer spec computes attention (see `planner.AttentionKind`): fused kernels everywhere
    (Transformer Engine's where it imports, torch's scaled_dot_product_attention otherwise)."""
    return "sdpa"


def _planned_attention(setting: str) -> str:
    """The planner's attention kind of a model's ``attention`` setting."""
    return "local" if setting == "local" else attention_kind()


def plan_train_memory(
    cfg: TrainConfig,
    world_size: int,
    device_gb: float,
    shapes_dir: Optional[str] = None,
    attention: Optional[str] = None,
    device: str = "cuda",
) -> MemoryPlan:
    """The per-rank memory plan of `cfg` on `world_size` GPUs of `device_gb` GB each.

    `device` ``cpu`` plans CPU ranks instead: `device_gb` is then each rank's share of the host's
    memory, the allowance beside the tensors is a CPU process's runtime (no CUDA context), and an
    unset ``rollout.kv_cache_gb`` is the rollout engines' CPU default (they do not size the cache
    from free memory on CPU).

    Architectures come from the checkpoints' ``hf/config.json`` or, for a job planned away from its
    checkpoints, from `shapes_dir` (``<checkpoint name>.json``). `attention` (``sdpa`` / ``local``)
    plans every model with that attention; None: each model's own ``attention`` setting. Builds
    nothing.
    """
    s_arch = load_architecture(cfg.student.checkpoint, shapes_dir)
    student = PlannedModel(
        "student", s_arch, cfg.student.layout, cfg.student.dtype, _planned_attention(cfg.student.attention)
    )
    pool = []
    if cfg.needs_teachers:
        for name, role, model_cfg, layout in planned_models(cfg.scoring, cfg.student.checkpoint, cfg.student.layout):
            arch = load_architecture(model_cfg.checkpoint, shapes_dir)
            dtype = (
                cfg.student.dtype
                if model_cfg.checkpoint == cfg.student.checkpoint and model_cfg.dtype is None
                else dense_dtype(model_cfg.dtype, arch)
            )
            pool.append(PlannedModel(f"{role} {name}", arch, layout, dtype, _planned_attention(model_cfg.attention)))
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    on_cpu = device == "cpu"
    kv_cache_gb = cfg.rollout.kv_cache_gb
    if kv_cache_gb is None and on_cpu:
        kv_cache_gb = DEFAULT_CPU_KV_CACHE_GB
    prompt = cfg.data.max_prompt_length
    plan = plan_memory(
        student=student,
        pool=pool,
        world_size=world_size,
        device_bytes=device_gb * GB,
        sample_tokens=(prompt or ASSUMED_PROMPT_TOKENS) + cfg.rollout.max_new_tokens,
        micro_batch_tokens=cfg.micro_batch_tokens,
        scoring_micro_batch_tokens=cfg.scoring.micro_batch_tokens,
        recompute=cfg.student.recompute,
        distributed_optimizer=cfg.optim.use_distributed_optimizer,
        offload_pool=cfg.scoring.offload_to_cpu,
        kv_cache_bytes=None if kv_cache_gb is None else kv_cache_gb * GB,
        kv_cache_fraction=cfg.rollout.kv_cache_fraction,
        attention=attention,
        logprobs_from_hidden=cfg.loss.logprobs_from_hidden,
        topk=min(cfg.loss.topk, s_arch.vocab_size) if cfg.loss.kind == "topk" else 0,
        **(
            dict(overhead_bytes=CPU_PROCESS_OVERHEAD_GB * GB, overhead_label="process runtime (torch, megatron-core)")
            if on_cpu
            else {}
        ),
    )
    if on_cpu and cfg.rollout.kv_cache_gb is None:
        plan.notes.append(f"KV budget: the CPU default rollout.kv_cache_gb={DEFAULT_CPU_KV_CACHE_GB}")
    if prompt is None:
        plan.notes.append(f"data.max_prompt_length is not set: prompts assumed <= {ASSUMED_PROMPT_TOKENS} tokens")
    return plan
