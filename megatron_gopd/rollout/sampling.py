"""Sampling shared by the rollout engines: per-sample seeds and uniform streams, top-k / top-p, CDF sampling.

Every engine samples with these functions, so that for the same logits and the same (seed, prompt
index, sample index) they choose the same token, whatever the batch, the schedule or the device.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np
import torch

from megatron_gopd.rollout.base import SamplingParams

__all__ = ["SampledTokens", "UniformStreams", "sample_from_logits", "sample_seed", "truncation_mask"]


def truncation_mask(scaled_logits: torch.Tensor, top_k: int, top_p: float) -> Optional[torch.Tensor]:
    """Which tokens top-k then top-p keep; None when neither truncates.

    Args:
        scaled_logits: ``[b, V]`` temperature-scaled logits over the real vocabulary.
        top_k: keep the k largest logits (0, or k >= V: no top-k).
        top_p: then keep the smallest set of most likely tokens whose probability under the top-k
            renormalised distribution reaches `top_p` (1: no top-p). The most likely token is
            always kept.

    Returns:
        ``[b, V]`` bool, True for the tokens that may be sampled.
    """
    vocab = scaled_logits.shape[-1]
    use_top_k = 0 < top_k < vocab
    if not use_top_k and top_p >= 1.0:
        return None
    allowed = torch.zeros_like(scaled_logits, dtype=torch.bool)  # [b, V]
    if top_p >= 1.0:
        kept = scaled_logits.topk(top_k, dim=-1).indices  # [b, k]; top-k alone needs no full sort
        return allowed.scatter_(1, kept, True)
    sorted_logits, order = scaled_logits.sort(dim=-1, descending=True)  # [b, V] each
    if use_top_k:
        sorted_logits[:, top_k:] = -float("inf")
    sorted_probs = sorted_logits.softmax(dim=-1)  # [b, V], renormalised over the top-k
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [b, V] probability of better tokens
    keep_sorted = mass_before < top_p  # the first token has mass_before 0 < top_p: always kept
    if use_top_k:
        keep_sorted[:, top_k:] = False
    return allowed.scatter_(1, order, keep_sorted)


@dataclasses.dataclass
class SampledTokens:
    """One sampling step's result for ``b`` samples."""

    token_ids: torch.Tensor
    """``[b]`` int64 sampled token ids."""
    sampler_logprobs: torch.Tensor
    """``[b]`` fp32 log-probs under the distribution sampled from (0 for greedy)."""
    logprobs: Optional[torch.Tensor]
    """``[b]`` fp32 temperature-1 log-probs over the real vocabulary, if asked for."""


def sample_from_logits(
    logits: torch.Tensor, vocab_size: int, sampling: SamplingParams, uniforms: torch.Tensor
) -> SampledTokens:
    """Sample one token per row by inverting the CDF at the given uniforms.

    Args:
        logits: ``[b, V_padded]`` full-vocabulary logits (any float dtype); columns at or beyond
            `vocab_size` are Megatron's vocabulary padding and are never sampled.
        vocab_size: the real vocabulary size.
        sampling: temperature, top-k and top-p (greedy when `SamplingParams.greedy`).
        uniforms: ``[b]`` float64 in [0, 1): one draw per row from that sample's own generator.
            One draw per token (instead of Gumbel noise over the vocabulary) keeps each sample's
            random stream short and independent of the vocabulary and the device.

    Returns:
        `SampledTokens`; a sampled token always has a non-zero probability.
    """
    real_logits = logits[:, :vocab_size].float()  # [b, V] fp32; padded rows dropped = masked to -inf
    logprobs_t1 = real_logits.log_softmax(dim=-1) if sampling.return_logprobs else None  # [b, V]
    if sampling.greedy:
        token_ids = real_logits.argmax(dim=-1)  # [b]
        sampler_logprobs = torch.zeros(token_ids.shape, dtype=torch.float32, device=logits.device)
    else:
        scaled = real_logits / sampling.temperature if sampling.temperature != 1.0 else real_logits
        allowed = truncation_mask(scaled, sampling.top_k, sampling.top_p)  # [b, V] or None
        if allowed is not None:
            scaled = scaled.masked_fill(~allowed, -float("inf"))
        sampler_log_dist = (
            scaled.log_softmax(dim=-1)
            if allowed is not None or sampling.temperature != 1.0 or logprobs_t1 is None
            else logprobs_t1
        )  # [b, V]
        # float64 CDF: a 150k-entry fp32 cumsum would lose the tail's resolution.
        cdf = sampler_log_dist.exp().double().cumsum(dim=-1)  # [b, V]
        total = cdf[:, -1:]  # [b, 1]
        # Keep the target strictly below the total, so the search lands on a token whose CDF step
        # is positive, i.e. one with non-zero probability (tokens outside top-k / top-p have none).
        target = torch.minimum(
            uniforms.to(cdf.device, torch.float64)[:, None] * total, torch.nextafter(total, torch.zeros_like(total))
        )  # [b, 1]
        token_ids = torch.searchsorted(cdf, target, right=True).squeeze(1)  # [b]
        sampler_logprobs = sampler_log_dist.gather(1, token_ids[:, None]).squeeze(1)
    logprobs = None if logprobs_t1 is None else logprobs_t1.gather(1, token_ids[:, None]).squeeze(1)
    return SampledTokens(token_ids=token_ids, sampler_logprobs=sampler_logprobs, logprobs=logprobs)


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The 64-bit seed of sample `sample_index` of prompt `prompt_index` under base seed `seed`.

    NumPy's SeedSequence mixes the three integers, so neighbouring (seed, i, j) give unrelated
    streams (a plain ``seed + i`` would make prompt 1 of seed 0 replay prompt 0 of seed 1).
    """
    state = np.random.SeedSequence([seed, prompt_index, sample_index]).generate_state(1, dtype=np.uint64)
    return int(state[0])


class UniformStreams:
    """One CPU `torch.Generator` per sample, read one uniform per generated token, in blocks.

    CPU generators give the same numbers on every device, so a sample's tokens depend only on
    (seed, prompt index, sample index) and the logits, not on the device, the batch or the TP size.
    """

    def __init__(self, seeds: Sequence[int], block: int = 256) -> None:
        self.block = block
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.tables: list[Optional[np.ndarray]] = [None] * len(seeds)
        self.block_ids = [-1] * len(seeds)

    def draw(self, samples: Sequence[int], steps: Sequence[int]) -> torch.Tensor:
        """``[len(samples)]`` float64 uniforms: draw number ``steps[k]`` of stream ``samples[k]``.

        Each stream must be read in order, one step at a time (step t, then t + 1, ...).
        """
        values = np.empty(len(samples), dtype=np.float64)
        for k, (sample, step) in enumerate(zip(samples, steps)):
            block_id = step // self.block
            if block_id != self.block_ids[sample]:
                if block_id != self.block_ids[sample] + 1:
                    raise RuntimeError(f"random stream {sample} read out of order at step {step}")
                self.tables[sample] = torch.rand(
                    self.block, generator=self.generators[sample], dtype=torch.float64
                ).numpy()
                self.block_ids[sample] = block_id
            values[k] = self.tables[sample][step % self.block]
        return torch.from_numpy(values)
