"""Pick the rollout engine for a student: the fast engine where it applies, else the Megatron one."""

from __future__ import annotations

import logging
from typing import Literal, Optional, Sequence

from megatron_gopd.models import ModelArchitecture, ParallelLayout
from megatron_gopd.rollout.base import RolloutEngine
from megatron_gopd.rollout.fast_engine import FastRolloutEngine
from megatron_gopd.rollout.fast_support import fast_engine_unsupported_reason
from megatron_gopd.rollout.megatron_engine import MegatronRolloutEngine

logger = logging.getLogger(__name__)

EngineKind = Literal["auto", "fast", "megatron"]
ENGINE_KINDS: tuple[str, ...] = ("auto", "fast", "megatron")


def build_rollout_engine(
    kind: EngineKind,
    model,
    arch: ModelArchitecture,
    *,
    eos_token_ids: Sequence[int] = (),
    max_sequence_length: Optional[int] = None,
    layout: Optional[ParallelLayout] = None,
    kv_cache_gb: Optional[float] = None,
    max_batch_size: Optional[int] = None,
    pipeline_microbatch_tokens: Optional[int] = None,
    **fast_options,
) -> RolloutEngine:
    """The rollout engine of `kind` for this rank's student chunk `model`.

    ``"auto"``: `FastRolloutEngine` when `fast_engine_unsupported_reason` finds nothing against it,
    else `MegatronRolloutEngine`, with one logged line saying why. ``"fast"``: the fast engine, or a
    ValueError naming the reason. ``"megatron"``: the reference engine.

    `kv_cache_gb` and `fast_options` (``kv_cache_memory_fraction``, ``max_slots``,
    ``prefill_token_budget``, ``cuda_graphs``) go to the fast engine; `max_batch_size` and
    `pipeline_microbatch_tokens` to the Megatron engine. `layout` adds the checks that need the
    parallel layout (the built model already shows most of them).
    """
    if kind not in ENGINE_KINDS:
        raise ValueError(f"rollout engine {kind!r} is not one of {', '.join(ENGINE_KINDS)}")
    if kind != "megatron":
        reason = fast_engine_unsupported_reason(model, arch, layout)
        if reason is None:
            return FastRolloutEngine(
                model,
                arch,
                eos_token_ids=eos_token_ids,
                max_sequence_length=max_sequence_length,
                kv_cache_gb=kv_cache_gb,
                **fast_options,
            )
        if kind == "fast":
            raise ValueError(f"rollout engine 'fast' was requested but cannot run this student: {reason}")
        logger.info("rollout engine: falling back to the Megatron engine (%s)", reason)
    return MegatronRolloutEngine(
        model,
        arch,
        eos_token_ids=eos_token_ids,
        max_sequence_length=max_sequence_length,
        max_batch_size=max_batch_size,
        pipeline_microbatch_tokens=pipeline_microbatch_tokens,
    )
