"""Verifier rewards of a step's rollouts and their group normalisation (`megatron_gopd.trainer.rewards`)."""

from __future__ import annotations

import pytest

from megatron_gopd.data.sampler import PromptRecord
from megatron_gopd.rollout import RolloutBatch
from megatron_gopd.rollout.base import RolloutSample
from megatron_gopd.testing.tiny_tokenizer import build_tiny_tokenizer
from megatron_gopd.trainer.rewards import TRUNCATED_REWARD, group_normalised_advantages, verifier_rewards


def _rollouts(tokenizer, texts_and_reasons):
    """One prompt's samples (prompt 0), each a response text and how it ended."""
    samples = []
    for i, (text, reason) in enumerate(texts_and_reasons):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        samples.append(RolloutSample(0, i, ids, [0.0] * len(ids), None, reason))
    return RolloutBatch(samples)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def math_record():
    return PromptRecord(index=0, input_ids=[1], messages=[], domain="math", source="t", answer="7")


def test_truncated_responses_score_as_failures_by_default(tokenizer, math_record):
    # The third response has the right answer in its text but was cut at the length limit.
    rollouts = _rollouts(tokenizer, [("\\boxed{7}", "stop"), ("\\boxed{8}", "stop"), ("\\boxed{7} and then", "length")])
    rewards = verifier_rewards([math_record], rollouts, tokenizer)
    assert rewards == [1.0, 0.0, TRUNCATED_REWARD] and TRUNCATED_REWARD == 0.0
    advantages = group_normalised_advantages([0, 0, 0], rewards, weight=1.0)
    # The cut response takes part in the group statistics (mean 1/3) and is pushed down.
    assert advantages[2] < 0 and advantages[2] == pytest.approx(advantages[1])
    assert advantages[0] > 0 and sum(advantages) == pytest.approx(0.0, abs=1e-6)


def test_skip_leaves_truncated_responses_out_of_the_group(tokenizer, math_record):
    rollouts = _rollouts(tokenizer, [("\\boxed{7}", "stop"), ("\\boxed{8}", "stop"), ("\\boxed{7} and then", "length")])
    rewards = verifier_rewards([math_record], rollouts, tokenizer, truncated="skip")
    assert rewards == [1.0, 0.0, None]
    advantages = group_normalised_advantages([0, 0, 0], rewards, weight=2.0)
    assert advantages[2] == 0.0
    # mean 0.5, std 0.5 over the two scored responses: +-1 times the weight
    assert advantages[:2] == pytest.approx([2.0, -2.0], abs=1e-5)


def test_groups_with_one_reward_or_equal_rewards_get_no_advantage():
    assert group_normalised_advantages([0, 0, 1], [1.0, None, 1.0], weight=1.0) == [0.0, 0.0, 0.0]
    assert group_normalised_advantages([0, 0], [1.0, 1.0], weight=1.0) == [0.0, 0.0]
