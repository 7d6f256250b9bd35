"""Rollout engines: the student samples its own responses (token ids, sampler log-probs, finish reasons).

`MegatronRolloutEngine` (the default) samples from the student's Megatron model in place, KV-cached,
on any TP / PP layout, on CPU and GPU. `VLLMRolloutEngine` samples with vLLM, one engine per
data-parallel replica, the student's weights copied in before each rollout (`sync_weights`).
Engines share the `RolloutEngine` interface::

    engine = MegatronRolloutEngine(model, arch, eos_token_ids=[tokenizer.eos_token_id])
    batch = engine.generate(prompt_token_ids, SamplingParams(max_new_tokens=1024, n=4, seed=step))
    batch[0].token_ids, batch[0].sampler_logprobs, batch[0].finish_reason
"""

from megatron_gopd.rollout.base import (FINISH_REASONS, FinishReason, RolloutBatch, RolloutEngine, RolloutSample,
                                        SamplingParams, validate_request)
from megatron_gopd.rollout.megatron_engine import (GenerationStats, MegatronRolloutEngine, SampledTokens,
                                                   sample_from_logits, sample_seed, truncation_mask)
from megatron_gopd.rollout.vllm_engine import VLLMRolloutEngine, check_vllm_support, vllm_installed

__all__ = ["FINISH_REASONS", "FinishReason", "GenerationStats", "MegatronRolloutEngine", "RolloutBatch",
           "RolloutEngine", "RolloutSample", "SampledTokens", "SamplingParams", "sample_from_logits",
           "sample_seed", "truncation_mask", "validate_request", "VLLMRolloutEngine", "check_vllm_support",
           "vllm_installed"]
