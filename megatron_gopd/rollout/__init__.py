"""Rollout engines: the student samples its own responses (token ids, sampler log-probs, finish reasons).

`FastRolloutEngine` (dense students, local layer spec, one pipeline stage) decodes with continuous
batching over KV slots; `MegatronRolloutEngine` samples through megatron-core's inference path on any
TP / PP layout and is the reference and the fallback; `VLLMRolloutEngine` samples with vLLM, one
engine per data-parallel replica, the student's weights copied in before each rollout
(`sync_weights`). `build_rollout_engine` picks one. All share the `RolloutEngine` interface::

    engine = build_rollout_engine("auto", model, arch, eos_token_ids=[tokenizer.eos_token_id], kv_cache_gb=20)
    batch = engine.generate(prompt_token_ids, SamplingParams(max_new_tokens=1024, n=4, seed=step))
    batch[0].token_ids, batch[0].sampler_logprobs, batch[0].finish_reason
    engine.release()  # before training: frees the KV slots
"""

from megatron_gopd.rollout.base import (
    FINISH_REASONS,
    FinishReason,
    RolloutBatch,
    RolloutEngine,
    RolloutSample,
    SamplingParams,
    validate_request,
)
from megatron_gopd.rollout.factory import ENGINE_KINDS, build_rollout_engine
from megatron_gopd.rollout.fast_engine import FastGenerationStats, FastRolloutEngine
from megatron_gopd.rollout.fast_support import fast_engine_unsupported_reason
from megatron_gopd.rollout.megatron_engine import GenerationStats, MegatronRolloutEngine
from megatron_gopd.rollout.sampling import SampledTokens, sample_from_logits, sample_seed, truncation_mask
from megatron_gopd.rollout.vllm_engine import VLLMRolloutEngine, check_vllm_support, vllm_installed

__all__ = [
    "ENGINE_KINDS",
    "FINISH_REASONS",
    "FastGenerationStats",
    "FastRolloutEngine",
    "FinishReason",
    "GenerationStats",
    "MegatronRolloutEngine",
    "RolloutBatch",
    "RolloutEngine",
    "RolloutSample",
    "SampledTokens",
    "SamplingParams",
    "VLLMRolloutEngine",
    "build_rollout_engine",
    "check_vllm_support",
    "fast_engine_unsupported_reason",
    "sample_from_logits",
    "sample_seed",
    "truncation_mask",
    "validate_request",
    "vllm_installed",
]
