"""Tests of megatron_gopd.loss: G-OPD advantages, policy loss, aggregation, full-vocab/top-k KL."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_gopd.logprobs import token_logprobs_from_logits
from megatron_gopd.loss import (
    AGG_MODES,
    LOGPROB_FLOOR,
    aggregate_loss,
    full_vocab_reverse_kl,
    gopd_advantages,
    gopd_advantages_detailed,
    loss_normaliser,
    policy_loss,
    topk_reverse_kl,
)


def _logps(batch: int = 4, seq: int = 6, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Student, teacher, reference log-probs [b, s] (negative, like real log-probs)."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(-torch.rand(batch, seq, generator=gen) * 5 for _ in range(3))


def _ragged_mask(batch: int = 4, seq: int = 6) -> torch.Tensor:
    lengths = torch.tensor([6, 3, 1, 0, 5, 2, 4, 6][:batch])  # one empty row
    return torch.arange(seq)[None, :] < lengths[:, None]  # [b, s]


# ----------------------------------------------------------------------------------------------
# Advantages


def test_lam_one_reduces_to_teacher_minus_student_exactly() -> None:
    student, teacher, ref = _logps()
    expected = teacher - student
    assert torch.equal(gopd_advantages(student, teacher, None, 1.0), expected)
    # The reference drops out exactly, even when given.
    assert torch.equal(gopd_advantages(student, teacher, ref, 1.0), expected)


@pytest.mark.parametrize("lam", [0.5, 1.25, 2.0])
def test_advantage_formula_and_detached(lam: float) -> None:
    student, teacher, ref = _logps()
    student = student.clone().requires_grad_()
    adv = gopd_advantages(student, teacher, ref, lam)
    assert not adv.requires_grad and adv.dtype == torch.float32
    torch.testing.assert_close(adv, lam * (teacher - ref) - (student.detach() - ref))


def test_missing_reference_needs_lam_one() -> None:
    student, teacher, _ = _logps()
    with pytest.raises(ValueError, match="lam == 1"):
        gopd_advantages(student, teacher, None, 1.25)
    with pytest.raises(ValueError, match="shape"):
        gopd_advantages(student, teacher[:, :-1], None, 1.0)


def test_nonfinite_teacher_and_ref_logprobs_are_clamped_and_counted() -> None:
    student, teacher, ref = _logps(batch=2, seq=4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    teacher = teacher.clone()
    teacher[0, 0] = -math.inf
    teacher[1, 2] = math.nan
    teacher[0, 3] = -math.inf  # off the mask: clamped, but not counted
    ref = ref.clone()
    ref[1, 1] = -1e4  # finite but absurd: below the floor
    result = gopd_advantages_detailed(student, teacher, ref, 1.5)
    assert torch.isfinite(result.advantages).all()
    assert result.advantages[0, 0] == pytest.approx(
        1.5 * (LOGPROB_FLOOR - ref[0, 0].item()) - (student[0, 0].item() - ref[0, 0].item())
    )
    assert result.advantages[1, 1] == pytest.approx(
        1.5 * (teacher[1, 1].item() - LOGPROB_FLOOR) - (student[1, 1].item() - LOGPROB_FLOOR)
    )
    metrics = result.metrics(mask)
    assert metrics["teacher_logp_clamped"].item() == 2
    assert metrics["ref_logp_clamped"].item() == 1
    assert all(torch.isfinite(v) for v in metrics.values())
    # The tensor API agrees with the detailed one.
    assert torch.equal(gopd_advantages(student, teacher, ref, 1.5), result.advantages)


def test_advantage_metrics() -> None:
    student, teacher, ref = _logps()
    mask = _ragged_mask()
    entropy = torch.rand(student.shape)
    metrics = gopd_advantages_detailed(student, teacher, ref, 1.25).metrics(mask, entropy=entropy)
    adv = 1.25 * (teacher - ref) - (student - ref)
    expected = {
        "advantage_mean": adv[mask].mean(),
        "reverse_kl_sampled": (student - teacher)[mask].mean(),
        "implicit_reward_mean": (teacher - ref)[mask].mean(),
        "entropy_mean": entropy[mask].mean(),
        "teacher_logp_clamped": torch.tensor(0.0),
        "ref_logp_clamped": torch.tensor(0.0),
    }
    assert metrics.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(metrics[name], value, msg=name)
    # Without a reference there is no implicit reward to report.
    assert "implicit_reward_mean" not in gopd_advantages_detailed(student, teacher, None, 1.0).metrics(mask)


# ----------------------------------------------------------------------------------------------
# Policy loss


def test_reinforce_gradient_is_weighted_advantage_over_token_count() -> None:
    student, teacher, _ = _logps()
    mask = _ragged_mask()
    logp = student.clone().requires_grad_()
    adv = gopd_advantages(logp, teacher, None, 1.0)
    loss, metrics = policy_loss(logp, adv, mask)
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, torch.where(mask, -adv, 0.0) / mask.sum())
    torch.testing.assert_close(metrics["advantage_mean"], adv[mask].mean())


def test_truncated_importance_weights() -> None:
    student, teacher, _ = _logps(batch=1, seq=4)
    mask = torch.ones(1, 4, dtype=torch.bool)
    # Train/sampler ratios 1, e^0.5, e^3 (truncated to 5), e^-1.
    sampler = student - torch.tensor([[0.0, 0.5, 3.0, -1.0]])
    logp = student.clone().requires_grad_()
    adv = gopd_advantages(logp, teacher, None, 1.0)
    loss, metrics = policy_loss(logp, adv, mask, sampler_logp=sampler, tis_cap=5.0)
    weights = torch.tensor([[1.0, math.exp(0.5), 5.0, math.exp(-1.0)]])
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, -weights * adv / 4)
    assert metrics["is_truncated_frac"].item() == pytest.approx(0.25)
    assert metrics["is_weight_mean"].item() == pytest.approx(weights.mean().item())
    assert metrics["sampler_logp_abs_diff"].item() == pytest.approx(4.5 / 4)
    with pytest.raises(ValueError, match="tis_cap"):
        policy_loss(logp, adv, mask, tis_cap=5.0)


def test_ppo_clipping_against_old_logprobs() -> None:
    mask = torch.ones(1, 4, dtype=torch.bool)
    old = torch.full((1, 4), -2.0)
    # ratios e^0.5 (clipped, A > 0), e^-0.5 (clipped, A < 0), e^0.1 (inside), e^0.5 (A < 0: the
    # unclipped branch is the smaller, so it keeps its gradient).
    logp = (old + torch.tensor([[0.5, -0.5, 0.1, 0.5]])).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, metrics = policy_loss(logp, adv, mask, clip_eps=0.2, old_logp=old)
    (grad,) = torch.autograd.grad(loss, logp)
    ratio = torch.exp(logp.detach() - old)
    expected = torch.tensor([[0.0, 0.0, -ratio[0, 2].item(), ratio[0, 3].item()]]) / 4
    torch.testing.assert_close(grad, expected)
    assert metrics["clip_frac"].item() == pytest.approx(0.5)
    # First pass over a batch (old == current): same gradient as plain REINFORCE.
    logp_now = old.clone().requires_grad_()
    loss_ppo, _ = policy_loss(logp_now, adv, mask, clip_eps=0.2, old_logp=old)
    loss_pg, _ = policy_loss(logp_now, adv, mask)
    torch.testing.assert_close(torch.autograd.grad(loss_ppo, logp_now)[0], torch.autograd.grad(loss_pg, logp_now)[0])


def test_aggregation_modes_values() -> None:
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    assert aggregate_loss(per_token, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate_loss(per_token, mask, "seq-mean-token-sum").item() == pytest.approx(10 / 2)
    assert aggregate_loss(per_token, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    with pytest.raises(ValueError, match="agg"):
        aggregate_loss(per_token, mask, "sum")


@pytest.mark.parametrize("agg", AGG_MODES)
def test_aggregation_is_invariant_to_micro_batch_split(agg: str) -> None:
    batch, seq = 8, 6
    student, teacher, ref = _logps(batch, seq)
    sampler = student + 0.1 * torch.randn(batch, seq, generator=torch.Generator().manual_seed(3))
    mask = _ragged_mask(batch, seq)
    adv = gopd_advantages(student, teacher, ref, 1.25)

    def run(splits: list[slice]) -> tuple[torch.Tensor, torch.Tensor]:
        logp = student.clone().requires_grad_()
        # The step's global normaliser: every micro-batch's share, summed (all-reduced over DP).
        num_tokens = sum(loss_normaliser(mask[rows], agg) for rows in splits)
        total = sum(
            policy_loss(logp[rows], adv[rows], mask[rows], sampler[rows], tis_cap=2.0, agg=agg, num_tokens=num_tokens)[
                0
            ]
            for rows in splits
        )
        return total, torch.autograd.grad(total, logp)[0]

    full_loss, full_grad = run([slice(0, batch)])
    # Micro-batches of uneven size, one of them holding only the empty row, as on 2 DP ranks x 2.
    for splits in ([slice(0, 3), slice(3, 4), slice(4, 8)], [slice(i, i + 1) for i in range(8)]):
        loss, grad = run(splits)
        torch.testing.assert_close(loss, full_loss)
        torch.testing.assert_close(grad, full_grad)


# ----------------------------------------------------------------------------------------------
# Bandit: the sampled-token objective converges to the closed-form G-OPD optimum


@pytest.mark.parametrize("lam", [0.5, 1.0, 1.5])
def test_bandit_converges_to_closed_form(lam: float) -> None:
    vocab, num_samples, steps = 12, 1024, 250
    gen = torch.Generator().manual_seed(0)
    log_teacher = torch.log_softmax(1.5 * torch.randn(vocab, generator=gen), -1)
    log_ref = torch.log_softmax(torch.randn(vocab, generator=gen), -1)
    student_logits = log_ref.clone().requires_grad_()  # the student starts at the reference
    optimizer = torch.optim.Adam([student_logits], lr=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    mask = torch.ones(1, num_samples, dtype=torch.bool)
    for _ in range(steps):
        with torch.no_grad():  # one token per "rollout", sampled from the student
            tokens = torch.multinomial(torch.softmax(student_logits, -1), num_samples, replacement=True, generator=gen)
        logits = student_logits[None, None, :].expand(num_samples, 1, vocab)  # [s, b=1, V]
        student_logp = token_logprobs_from_logits(logits, tokens[:, None]).t()  # [1, n]
        adv = gopd_advantages(student_logp, log_teacher[tokens][None], log_ref[tokens][None], lam)
        loss, _ = policy_loss(student_logp, adv, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    optimum = torch.softmax(lam * log_teacher + (1 - lam) * log_ref, -1)
    tv = 0.5 * (torch.softmax(student_logits.detach(), -1) - optimum).abs().sum().item()
    assert tv < 0.03, f"lam={lam}: TV(student, closed form) = {tv:.4f}"


# ----------------------------------------------------------------------------------------------
# Full-vocabulary and top-k variants


def _exact_kl(
    student: torch.Tensor, teacher: torch.Tensor, ref: torch.Tensor, lam: float, temperature: float = 1.0
) -> torch.Tensor:
    """Naive KL(pi_student || q) over the last dim, q ∝ ref^(1-lam) teacher^lam, full tensors."""
    log_p = torch.log_softmax(student / temperature, -1)
    log_q = torch.log_softmax(
        lam * torch.log_softmax(teacher / temperature, -1) + (1 - lam) * torch.log_softmax(ref / temperature, -1), -1
    )
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _three_logits(seq: int = 5, batch: int = 3, vocab: int = 40, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(2 * torch.randn(seq, batch, vocab, generator=gen) for _ in range(3))


@pytest.mark.parametrize("lam,temperature", [(1.0, 1.0), (0.5, 0.7), (1.5, 1.0)])
def test_full_vocab_kl_value_and_gradient_match_autograd_of_exact_kl(lam: float, temperature: float) -> None:
    real_vocab = 33  # rows 33..39 are padding
    student, teacher, ref = _three_logits()
    student.requires_grad_()
    upstream = torch.randn(student.shape[:2], generator=torch.Generator().manual_seed(1))
    kl = full_vocab_reverse_kl(student, teacher, ref, lam, temperature=temperature, vocab_size=real_vocab, chunk_size=4)
    exact = _exact_kl(student[..., :real_vocab], teacher[..., :real_vocab], ref[..., :real_vocab], lam, temperature)
    torch.testing.assert_close(kl, exact, atol=2e-5, rtol=1e-5)
    (grad,) = torch.autograd.grad((kl * upstream).sum(), student)
    (want,) = torch.autograd.grad((exact * upstream).sum(), student)
    torch.testing.assert_close(grad, want, atol=2e-6, rtol=1e-5)
    assert torch.all(grad[..., real_vocab:] == 0)


def test_full_vocab_kl_is_zero_at_the_target_and_needs_ref() -> None:
    _, teacher, ref = _three_logits()
    lam = 1.25
    target_logits = lam * torch.log_softmax(teacher, -1) + (1 - lam) * torch.log_softmax(ref, -1)
    kl = full_vocab_reverse_kl(target_logits, teacher, ref, lam)
    assert kl.abs().max() < 1e-5
    with pytest.raises(ValueError, match="lam == 1"):
        full_vocab_reverse_kl(target_logits, teacher, None, lam)


def test_topk_kl_with_full_k_equals_full_vocab_kl() -> None:
    student, teacher, ref = _three_logits(vocab=16)
    ids = torch.argsort(teacher, dim=-1, descending=True)  # "top-k" with k = V
    lam = 1.5

    def at_ids(logits: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits, -1).gather(-1, ids)  # [s, b, V]

    topk = topk_reverse_kl(at_ids(student), at_ids(teacher), at_ids(ref), lam)
    exact = _exact_kl(student, teacher, ref, lam)
    # Only the floored tail bucket (mass 1e-6) separates the two.
    torch.testing.assert_close(topk, exact, atol=1e-4, rtol=1e-4)


def test_topk_kl_gradient_through_vocab_parallel_logprobs() -> None:
    student, teacher, ref = _three_logits()
    student.requires_grad_()
    k, lam = 5, 0.5
    ids = torch.topk(teacher, k, dim=-1).indices  # [s, b, k] the teacher's top-k
    teacher_topk = torch.log_softmax(teacher, -1).gather(-1, ids)
    ref_topk = torch.log_softmax(ref, -1).gather(-1, ids)
    student_topk = token_logprobs_from_logits(student, ids, chunk_size=2)  # [s, b, k]
    kl = topk_reverse_kl(student_topk, teacher_topk, ref_topk, lam)
    naive_topk = torch.log_softmax(student, -1).gather(-1, ids)
    naive = topk_reverse_kl(naive_topk, teacher_topk, ref_topk, lam)
    torch.testing.assert_close(kl, naive, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        torch.autograd.grad(kl.sum(), student)[0], torch.autograd.grad(naive.sum(), student)[0], atol=1e-6, rtol=1e-5
    )
    assert torch.all(kl >= -1e-6)


def test_topk_kl_bounds_full_kl_from_below_at_lam_one() -> None:
    # With lam = 1 the tail bucket holds exactly the teacher's leftover mass: merging outcomes
    # can only lower a KL divergence, and zero KL needs the student to match on the top-k and tail.
    student, teacher, _ = _three_logits()
    ids = torch.topk(teacher, 6, dim=-1).indices
    topk = topk_reverse_kl(
        torch.log_softmax(student, -1).gather(-1, ids), torch.log_softmax(teacher, -1).gather(-1, ids), None, 1.0
    )
    full = full_vocab_reverse_kl(student, teacher, None, 1.0)
    assert torch.all(topk <= full + 1e-5)
    assert torch.all(topk > 0)
    same = topk_reverse_kl(
        torch.log_softmax(teacher, -1).gather(-1, ids), torch.log_softmax(teacher, -1).gather(-1, ids), None, 1.0
    )
    assert same.abs().max() < 1e-5
