"""Where the top-k loss (`loss.kind=topk`) leads a student: its tabular optimum against the G-OPD target.

The target is q = softmax(lam log pi* + (1 - lam) log pi_ref) over the whole vocabulary. A free
("tabular") student is optimised with the project's own `topk_reverse_kl` until it stops moving, and
its log-probs of the teacher's top-k tokens are compared with log q.
"""

from __future__ import annotations

import pytest
import torch

from megatron_gopd.loss import topk_reverse_kl

VOCAB, K = 40, 8


def _teacher_and_reference(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs [VOCAB] of a peaked, LM-like teacher and of its reference (its pre-RL base: the
    same distribution with its logits perturbed)."""
    gen = torch.Generator().manual_seed(seed)
    base_logits = torch.randn(VOCAB, generator=gen, dtype=torch.float64) * 3.0
    teacher_logits = base_logits + torch.randn(VOCAB, generator=gen, dtype=torch.float64) * 0.7
    return torch.log_softmax(teacher_logits, dim=-1), torch.log_softmax(base_logits, dim=-1)


def _tabular_optimum(teacher: torch.Tensor, ref: torch.Tensor, topk_ids: torch.Tensor, lam: float) -> torch.Tensor:
    """The student log-probs [VOCAB] minimising the top-k reverse KL, found by L-BFGS."""
    logits = torch.zeros(VOCAB, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [logits], lr=1.0, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad()
        student = torch.log_softmax(logits, dim=-1)
        loss = topk_reverse_kl(student[topk_ids], teacher[topk_ids], ref[topk_ids], lam)
        loss.backward()
        return loss

    for _ in range(20):
        optimizer.step(closure)
    return torch.log_softmax(logits.detach(), dim=-1)


@pytest.mark.parametrize("lam", [0.5, 1.0, 1.5])
def test_topk_optimum_is_the_gopd_target_up_to_the_documented_tail_offset(lam):
    teacher, ref = _teacher_and_reference(0)
    topk_ids = torch.argsort(teacher, descending=True)[:K]
    student = _tabular_optimum(teacher, ref, topk_ids, lam)
    exact = torch.log_softmax(lam * teacher + (1 - lam) * ref, dim=-1)  # the G-OPD target over V
    offset = student[topk_ids] - exact[topk_ids]  # [K]

    # Ratios within the top-k are exact: every top-k token is off by one common offset c. (The loss
    # runs in fp32, so L-BFGS stops within ~1e-3 nats on tokens of ~1% mass; the stationarity check
    # below is the precise one.)
    assert (offset - offset.mean()).abs().max().item() < 3e-3
    # c = log((W + S) / (W + S_hat)): W the top-k target mass, S the exact tail sum of
    # teacher^lam ref^(1-lam), S_hat the bucket's (teacher tail)^lam (ref tail)^(1-lam).
    in_topk = torch.zeros(VOCAB, dtype=torch.bool)
    in_topk[topk_ids] = True
    weights = torch.exp(lam * teacher + (1 - lam) * ref)
    top_mass, tail_exact = weights[in_topk].sum(), weights[~in_topk].sum()
    tail_bucket = teacher.exp()[~in_topk].sum() ** lam * ref.exp()[~in_topk].sum() ** (1 - lam)
    predicted = torch.log((top_mass + tail_exact) / (top_mass + tail_bucket))
    assert offset.mean().item() == pytest.approx(predicted.item(), abs=3e-3)

    # Precisely: the target shifted by c on the top-k (the tail taking the rest) is where the loss's
    # gradient vanishes; the exact target itself is not (for lam != 1).
    def gradient_at(top_logp: torch.Tensor) -> float:
        tail = torch.log1p(-top_logp.exp().sum())
        logits = torch.cat([top_logp, tail[None]]).clone().requires_grad_(True)  # [K + 1]: top-k, tail
        bucket = torch.log_softmax(logits, dim=-1)
        topk_reverse_kl(bucket[:K], teacher[topk_ids], ref[topk_ids], lam).backward()
        return logits.grad.abs().max().item()

    assert gradient_at(exact[topk_ids] + predicted) < 1e-6
    if lam != 1.0:
        assert gradient_at(exact[topk_ids]) > 100 * gradient_at(exact[topk_ids] + predicted)
    # The documented bound |c| <= |S - S_hat| / W, and the sign Hoelder's inequality gives.
    assert abs(predicted.item()) <= abs(tail_exact - tail_bucket).item() / top_mass.item() + 1e-12
    if lam == 1.0:
        assert abs(predicted.item()) < 1e-12  # the bucket is exact: OPD's top-k optimum is the teacher's
    elif lam < 1.0:
        assert predicted.item() <= 0.0
    else:
        assert predicted.item() >= 0.0
    # The stated tolerance for LM-like distributions whose top-8 hold most of both models' mass.
    assert abs(offset.mean().item()) < 0.02


def test_topk_covering_the_vocabulary_is_the_exact_target():
    teacher, ref = _teacher_and_reference(1)
    all_ids = torch.arange(VOCAB)
    student = _tabular_optimum(teacher, ref, all_ids, 1.5)
    exact = torch.log_softmax(1.5 * teacher + (1 - 1.5) * ref, dim=-1)
    # Compared as probabilities: tokens of ~1e-7 mass barely move an fp32 loss, whatever their log-prob.
    torch.testing.assert_close(student.exp(), exact.exp(), atol=1e-4, rtol=0)
