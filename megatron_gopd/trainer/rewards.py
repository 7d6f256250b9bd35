"""Sequence-level verifier rewards of a step's rollouts and their group-normalised advantages."""

from __future__ import annotations

import math
from typing import Optional, Sequence

from megatron_gopd.data import PromptRecord
from megatron_gopd.rollout import RolloutBatch

TRUNCATED_REWARD = 0.0
"""The reward of a response cut at the length limit under ``reward.truncated=fail``: a wrong answer's."""


def verifier_rewards(
    records: Sequence[PromptRecord], rollouts: RolloutBatch, tokenizer, truncated: str = "fail", max_workers: int = 2
) -> list[Optional[float]]:
    """Each rollout's verifier reward (scored in parallel). A truncated response (its answer is
    incomplete) is not run through the verifier: it gets `TRUNCATED_REWARD` when ``truncated`` is
    ``"fail"`` and None (left out of the group statistics) when it is ``"skip"``."""
    from megatron_gopd.verifiers import score_batch

    complete = [i for i, rollout in enumerate(rollouts) if rollout.finish_reason != "length"]
    texts = [tokenizer.decode(rollouts[i].token_ids, skip_special_tokens=True) for i in complete]
    fields = [records[rollouts[i].prompt_index].verifier_fields() for i in complete]
    cut_reward = TRUNCATED_REWARD if truncated == "fail" else None
    rewards: list[Optional[float]] = [cut_reward] * len(rollouts)
    for i, result in zip(complete, score_batch(fields, texts, max_workers=max_workers)):
        rewards[i] = result.reward
    return rewards


def group_normalised_advantages(
    prompt_indices: Sequence[int], rewards: Sequence[Optional[float]], weight: float
) -> list[float]:
    """``weight * (reward - group mean) / (group std + 1e-6)`` over each prompt's group of responses.

    Responses without a reward (truncated) are left out of the group statistics and get 0, as does
    every response of a group with fewer than two rewards (nothing to compare against).
    """
    groups: dict[int, list[float]] = {}
    for prompt, reward in zip(prompt_indices, rewards):
        if reward is not None:
            groups.setdefault(prompt, []).append(reward)
    out = []
    for prompt, reward in zip(prompt_indices, rewards):
        group = groups.get(prompt, [])
        if reward is None or len(group) < 2:
            out.append(0.0)
            continue
        mean = sum(group) / len(group)
        std = math.sqrt(sum((g - mean) ** 2 for g in group) / len(group))
        out.append(weight * (reward - mean) / (std + 1e-6))
    return out
