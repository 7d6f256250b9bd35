"""The trainer's per-micro-batch objective and its metric sums, on hand-made micro-batches (no model)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_gopd.batching import TrainSample, collate
from megatron_gopd.loss import gopd_advantages, policy_loss, topk_reverse_kl
from megatron_gopd.trainer.config import LossConfig
from megatron_gopd.trainer.metrics import MetricSums, reduce_step_metrics
from megatron_gopd.trainer.objective import TrainObjective, teacher_row_groups


def _sample(
    gen: torch.Generator,
    teacher,
    lam: float,
    with_ref: bool,
    response_len: int = 4,
    outcome: float = 0.0,
    topk: int = 0,
) -> TrainSample:
    logp = lambda: -torch.rand(response_len, generator=gen) * 3  # noqa: E731
    topk_fields = {}
    if topk:
        topk_fields = dict(
            teacher_topk_ids=torch.randint(0, 10, (response_len, topk), generator=gen),
            teacher_topk_logprobs=-torch.rand(response_len, topk, generator=gen) * 3 - 2,
            ref_topk_logprobs=(-torch.rand(response_len, topk, generator=gen) * 3 - 2) if with_ref else None,
        )
    return TrainSample(
        prompt_ids=[1, 2, 3],
        response_ids=list(range(4, 4 + response_len)),
        sampler_logprobs=logp(),
        teacher_logprobs=logp(),
        ref_logprobs=logp() if with_ref else None,
        teacher=teacher,
        lam=lam,
        outcome_advantage=outcome,
        **topk_fields,
    )


def _mixed_batch(topk: int = 0):
    gen = torch.Generator().manual_seed(0)
    samples = [
        _sample(gen, "math", 1.5, True, topk=topk),
        _sample(gen, "code", 1.0, False, topk=topk),
        _sample(gen, "math", 1.5, True, response_len=2, topk=topk),
    ]
    mb = collate(samples, topk=topk)
    student = -torch.rand(mb.loss_mask.shape, generator=gen) * 3  # [b, s]
    return samples, mb, student


def test_sampled_loss_uses_each_rows_own_lam_and_reference():
    samples, mb, student = _mixed_batch()
    logp = student.clone().requires_grad_(True)
    objective = TrainObjective(LossConfig(), "gopd", uses_reward=False)
    loss, normaliser, metrics = objective(mb, logp, torch.zeros_like(student))

    # The same loss computed row group by row group with the loss module's functions directly.
    expected_adv = torch.zeros_like(student)
    for rows, lam, with_ref in (([0, 2], 1.5, True), ([1], 1.0, False)):
        expected_adv[rows] = gopd_advantages(
            student[rows], mb.teacher_logprobs[rows], mb.ref_logprobs[rows] if with_ref else None, lam
        )
    expected, _ = policy_loss(
        student, expected_adv * mb.loss_mask, mb.loss_mask, sampler_logp=mb.sampler_logprobs, tis_cap=5.0, num_tokens=1
    )
    torch.testing.assert_close(loss, expected)
    assert normaliser.item() == sum(len(s.response_ids) for s in samples)
    reduced = reduce_step_metrics([metrics], contributes=True)
    assert {
        "reverse_kl/math",
        "implicit_reward/math",
        "reverse_kl/code",
        "loss",
        "entropy",
        "is_weight_mean",
        "teacher_clamped",
    } <= set(reduced)
    assert "implicit_reward/code" not in reduced  # lam = 1: no reference scored
    math_rows = mb.loss_mask[[0, 2]].bool()
    kl = (student[[0, 2]] - mb.teacher_logprobs[[0, 2]])[math_rows].mean()
    assert reduced["reverse_kl/math"] == pytest.approx(kl.item(), rel=1e-5)


def test_rows_without_teacher_get_only_their_outcome_advantage():
    gen = torch.Generator().manual_seed(1)
    samples = [_sample(gen, None, 1.0, False, outcome=0.7), _sample(gen, None, 1.0, False, outcome=-0.7)]
    mb = collate(samples)
    student = -torch.rand(mb.loss_mask.shape, generator=gen)
    advantages = TrainObjective(LossConfig(), "gopd", uses_reward=True).advantages(mb, student, MetricSums())
    torch.testing.assert_close(advantages, mb.outcome_advantage * mb.loss_mask)
    assert teacher_row_groups(mb) == []


def test_rows_of_one_teacher_must_agree_on_lam():
    gen = torch.Generator().manual_seed(2)
    mb = collate([_sample(gen, "math", 1.5, True), _sample(gen, "math", 1.25, True)])
    with pytest.raises(ValueError, match="disagree"):
        teacher_row_groups(mb)


def test_topk_loss_is_the_reverse_kl_of_each_teacher_group():
    samples, mb, student = _mixed_batch(topk=3)
    gen = torch.Generator().manual_seed(3)
    student_topk = (-torch.rand(mb.topk_ids.shape, generator=gen) * 3 - 2).requires_grad_(True)
    objective = TrainObjective(LossConfig(kind="topk", topk=3), "gopd", uses_reward=False)
    loss, _, metrics = objective(mb, student, torch.zeros_like(student), student_topk)
    expected = torch.zeros_like(student)
    for rows, lam, with_ref in (([0, 2], 1.5, True), ([1], 1.0, False)):
        expected[rows] = topk_reverse_kl(
            student_topk[rows].detach(),
            mb.teacher_topk_logprobs[rows],
            mb.ref_topk_logprobs[rows] if with_ref else None,
            lam,
        )
    torch.testing.assert_close(loss, (expected * mb.loss_mask).sum())
    loss.backward()
    assert student_topk.grad is not None and student_topk.grad[mb.loss_mask.bool()].abs().sum() > 0
    assert {"target_kl/math", "target_kl/code"} <= set(reduce_step_metrics([metrics], contributes=True))


def test_sft_loss_is_the_cross_entropy_of_the_responses():
    _, mb, student = _mixed_batch()
    loss, normaliser, _ = TrainObjective(LossConfig(), "sft", uses_reward=False)(mb, student, torch.zeros_like(student))
    torch.testing.assert_close(loss, -(student * mb.loss_mask).sum())
    assert normaliser.item() == mb.loss_mask.sum().item()


def test_metric_sums_are_weighted_means_and_new_names_need_no_registration():
    first, second = MetricSums(), MetricSums()
    first.add_mean("entropy", torch.tensor(2.0) * 4, 4)  # mean 2 over 4 tokens
    second.add_mean("entropy", torch.tensor(5.0) * 1, 1)  # mean 5 over 1 token
    second.add_mean("a_brand_new_metric/some_teacher", 3.0, 2)
    second.add_mean("absent_teacher_metric", 0.0, 0)  # nothing measured: left out
    first.add_sum("teacher_clamped", 2)
    second.add_sum("teacher_clamped", torch.tensor(1))
    reduced = reduce_step_metrics([first, second], contributes=True)
    assert reduced == {"entropy": pytest.approx(13 / 5), "a_brand_new_metric/some_teacher": 1.5, "teacher_clamped": 3.0}
    assert reduce_step_metrics([first], contributes=False) == {}


def test_tis_cap_null_means_no_importance_correction_but_the_gap_is_still_logged():
    samples, mb, student = _mixed_batch()
    mb.sampler_logprobs = mb.sampler_logprobs - 9.0 * mb.loss_mask  # huge train/sampler gaps: weights ~ e^9
    objective = TrainObjective(LossConfig(tis_cap=None), "gopd", uses_reward=False)
    advantages = objective.advantages(mb, student, MetricSums())
    loss, _, metrics = objective(mb, student, torch.zeros_like(student))
    unweighted, _ = policy_loss(student, advantages, mb.loss_mask, num_tokens=1)
    torch.testing.assert_close(loss, unweighted)
    reduced = reduce_step_metrics([metrics], contributes=True)
    assert "is_weight_mean" not in reduced and reduced["sampler_logp_abs_diff"] > 8.0


def test_policy_loss_without_a_cap_applies_the_raw_importance_weights():
    """The library function's documented meaning of tis_cap=None with sampler log-probs: uncapped."""
    logp, mask = torch.tensor([[-1.0, -1.0]]), torch.ones(1, 2)
    sampler = torch.tensor([[-1.0 - 3.0, -1.0]])  # the first token is e^3 more likely to the trainer
    adv = torch.ones(1, 2)
    _, metrics = policy_loss(logp, adv, mask, sampler_logp=sampler, tis_cap=None)
    assert metrics["is_weight_mean"].item() == pytest.approx((math.exp(3.0) + 1.0) / 2)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_step_loss_is_the_same_however_sequences_are_split_over_micro_batches_and_ranks(agg):
    """What Megatron does with calculate_per_token_loss: sum the micro-batch losses and normalisers over
    micro-batches and data-parallel ranks, divide once. Any split of the sequences gives the full-batch
    loss and gradient (each sequence whole in one micro-batch)."""
    gen = torch.Generator().manual_seed(4)
    samples = [_sample(gen, "math", 1.5, True, response_len=n) for n in (1, 5, 2, 7, 3)]
    student = {id(s): -torch.rand(len(s.prompt_ids) + len(s.response_ids), generator=gen) for s in samples}
    objective = TrainObjective(LossConfig(agg=agg), "gopd", uses_reward=False)

    def step(split: list[list[list[int]]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        leaves = {i: student[id(samples[i])].clone().requires_grad_(True) for i in range(len(samples))}
        total_loss, total_norm = 0.0, 0.0
        for rank in split:  # a data-parallel rank: its micro-batches
            for rows in rank:
                mb = collate([samples[i] for i in rows])
                logp = torch.stack(
                    [torch.nn.functional.pad(leaves[i], (0, mb.loss_mask.shape[1] - len(leaves[i]))) for i in rows]
                )
                loss, normaliser, _ = objective(mb, logp, torch.zeros_like(logp))
                total_loss, total_norm = total_loss + loss, total_norm + normaliser
        step_loss = total_loss / total_norm
        step_loss.backward()
        return step_loss.detach(), [leaves[i].grad for i in range(len(samples))]

    whole_loss, whole_grads = step([[[0, 1, 2, 3, 4]]])
    split_loss, split_grads = step([[[3], [1, 4]], [[0, 2]]])
    torch.testing.assert_close(split_loss, whole_loss)
    for a, b in zip(split_grads, whole_grads):
        torch.testing.assert_close(a, b)
    if agg == "seq-mean-token-mean":  # by definition: the mean over sequences of each one's token mean
        mb = collate(samples)
        logp = torch.stack(
            [torch.nn.functional.pad(student[id(s)], (0, mb.loss_mask.shape[1] - len(student[id(s)]))) for s in samples]
        )
        advantages = objective.advantages(mb, logp, MetricSums())
        weights = torch.exp(logp - mb.sampler_logprobs).clamp(max=5.0)
        per_token = -(weights * advantages * logp)
        per_sequence = [(per_token[r] * mb.loss_mask[r]).sum() / mb.loss_mask[r].sum() for r in range(len(samples))]
        torch.testing.assert_close(whole_loss, torch.stack(per_sequence).mean())


@pytest.mark.parametrize("name", ["outcome", "sft"])
def test_no_teacher_name_is_special(name):
    """Teachers once named "outcome" / "sft" were skipped by name; now only a row's own fields count."""
    gen = torch.Generator().manual_seed(5)
    mb = collate([_sample(gen, name, 1.25, True), _sample(gen, None, 1.0, False, outcome=0.5)])
    student = -torch.rand(mb.loss_mask.shape, generator=gen)
    advantages = TrainObjective(LossConfig(), "gopd", uses_reward=True).advantages(mb, student, MetricSums())
    expected = gopd_advantages(student[:1], mb.teacher_logprobs[:1], mb.ref_logprobs[:1], 1.25) * mb.loss_mask[:1]
    torch.testing.assert_close(advantages[:1], expected)
    torch.testing.assert_close(advantages[1:], 0.5 * mb.loss_mask[1:])
