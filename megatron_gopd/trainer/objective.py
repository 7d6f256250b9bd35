"""The loss of one training micro-batch: G-OPD policy gradient, top-k reverse KL, outcome reward, SFT.

`TrainObjective` turns the student's log-probs of one `MicroBatch` (from the training forward pass
itself: the rollout batch feeds exactly one optimizer step, so no separate "old" student pass is
needed) into the loss Megatron's schedule backpropagates and the metric sums of that micro-batch.
Each row carries what its loss needs: the teacher that scored it (or none, for verifier-only and
SFT rows), that teacher's ``lam`` and whether a reference was scored. Nothing is looked up by
teacher name, and no teacher name changes behaviour.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from megatron_gopd.batching import MicroBatch
from megatron_gopd.loss import (
    aggregate_loss,
    gopd_advantages_detailed,
    loss_normaliser,
    masked_mean,
    policy_loss,
    topk_reverse_kl,
)
from megatron_gopd.trainer.config import LossConfig
from megatron_gopd.trainer.metrics import MetricSums


@dataclasses.dataclass(frozen=True)
class RowGroup:
    """The rows of a micro-batch scored by one teacher (they share its lam and reference)."""

    teacher: str
    rows: torch.Tensor  # [b] bool
    lam: float
    has_reference: bool


def teacher_row_groups(mb: MicroBatch) -> list[RowGroup]:
    """One `RowGroup` per teacher with rows in `mb`, in name order; rows without a teacher are left out.

    Raises ValueError when rows of one teacher disagree on lam or on having a reference (they
    were scored by different configurations: a bug upstream, not something to average over).
    """
    groups = []
    for teacher in sorted({t for t in mb.teachers if t is not None}):
        members = [i for i, t in enumerate(mb.teachers) if t == teacher]
        settings = {(mb.lams[i], mb.has_reference[i]) for i in members}
        if len(settings) != 1:
            raise ValueError(f"rows of teacher {teacher!r} disagree on (lam, has_reference): {sorted(settings)}")
        lam, has_reference = settings.pop()
        rows = torch.tensor([t == teacher for t in mb.teachers], device=mb.loss_mask.device)
        groups.append(RowGroup(teacher, rows, lam, has_reference))
    return groups


class TrainObjective:
    """The per-micro-batch loss of a `gopd-train` step.

    ``mode="sft"``: cross-entropy on the given responses. ``mode="gopd"`` with ``loss.kind="sampled"``:
    the paper's policy gradient on each sampled token's G-OPD advantage (plus the row's outcome
    advantage), with truncated importance weights against the sampler's log-probs.
    ``loss.kind="topk"``: the exact reverse KL to each row's G-OPD target over the teacher's top-k,
    plus the outcome term by policy gradient when `uses_reward`.

    Losses are sums over the micro-batch (``num_tokens=1``); Megatron divides by the step's global
    normaliser (`loss_normaliser`, returned per micro-batch), so micro-batching and data
    parallelism do not change the gradient.
    """

    def __init__(self, loss: LossConfig, mode: str, uses_reward: bool) -> None:
        self.loss = loss
        self.mode = mode
        self.uses_reward = uses_reward

    def __call__(
        self, mb: MicroBatch, logp: torch.Tensor, entropy: torch.Tensor, student_topk: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor, MetricSums]:
        """(loss, normaliser, metrics) of one micro-batch.

        Args:
            mb: the micro-batch.
            logp: ``[b, s]`` the student's log-probs of the target tokens, with gradient.
            entropy: ``[b, s]`` the student's entropy at each position.
            student_topk: ``[b, s, k]`` the student's log-probs of the teacher's top-k ids (top-k
                loss only), with gradient.
        """
        metrics = MetricSums()
        if self.mode == "sft":
            loss = aggregate_loss(-logp, mb.loss_mask, self.loss.agg, num_tokens=1)
        elif student_topk is not None:
            loss = self._topk_loss(mb, logp, student_topk, metrics)
        else:
            loss = self._policy_gradient(mb, logp, self.advantages(mb, logp.detach(), metrics), metrics)
        tokens = mb.loss_mask.sum()
        normaliser = loss_normaliser(mb.loss_mask, self.loss.agg)
        metrics.add_mean("entropy", masked_mean(entropy.detach(), mb.loss_mask) * tokens, tokens)
        metrics.add_mean("loss", loss.detach(), normaliser)
        return loss, normaliser, metrics

    def advantages(self, mb: MicroBatch, student_logp: torch.Tensor, metrics: MetricSums) -> torch.Tensor:
        """``[b, s]`` G-OPD advantages of each teacher's rows plus every row's outcome term, masked.

        Adds ``reverse_kl/<teacher>``, ``implicit_reward/<teacher>`` (with a reference) and
        ``teacher_clamped`` to `metrics`.
        """
        advantages = torch.zeros_like(student_logp)  # [b, s]
        clamped = torch.zeros((), device=student_logp.device)
        for group in teacher_row_groups(mb):
            rows = group.rows
            mask = mb.loss_mask[rows]
            detail = gopd_advantages_detailed(
                student_logp[rows],
                mb.teacher_logprobs[rows],
                mb.ref_logprobs[rows] if group.has_reference else None,
                group.lam,
            )
            advantages[rows] = detail.advantages
            tokens = mask.sum()
            metrics.add_mean(f"reverse_kl/{group.teacher}", masked_mean(detail.reverse_kl, mask) * tokens, tokens)
            if detail.implicit_reward is not None:
                metrics.add_mean(
                    f"implicit_reward/{group.teacher}", masked_mean(detail.implicit_reward, mask) * tokens, tokens
                )
            clamped = clamped + (detail.teacher_clamped & mask.bool()).sum()
        metrics.add_sum("teacher_clamped", clamped)
        advantages = advantages + mb.outcome_advantage
        return advantages * mb.loss_mask

    def _topk_loss(
        self, mb: MicroBatch, logp: torch.Tensor, student_topk: torch.Tensor, metrics: MetricSums
    ) -> torch.Tensor:
        """Top-k reverse KL to each row's G-OPD target, plus the policy-gradient outcome term.

        The sampled-token advantages are still computed for their metrics (reverse KL to the
        teacher, implicit reward), not for the gradient.
        """
        self.advantages(mb, logp.detach(), metrics)
        target_kl = torch.zeros_like(logp)  # [b, s]
        for group in teacher_row_groups(mb):
            rows = group.rows
            target_kl[rows] = topk_reverse_kl(
                student_topk[rows],
                mb.teacher_topk_logprobs[rows],
                mb.ref_topk_logprobs[rows] if group.has_reference else None,
                group.lam,
            )
            mask = mb.loss_mask[rows]
            tokens = mask.sum()
            metrics.add_mean(f"target_kl/{group.teacher}", masked_mean(target_kl[rows].detach(), mask) * tokens, tokens)
        loss = aggregate_loss(target_kl, mb.loss_mask, self.loss.agg, num_tokens=1)
        if self.uses_reward:  # the verifier's group-normalised reward, by policy gradient
            loss = loss + self._policy_gradient(mb, logp, mb.outcome_advantage * mb.loss_mask, metrics)
        return loss

    def _policy_gradient(
        self, mb: MicroBatch, logp: torch.Tensor, advantages: torch.Tensor, metrics: MetricSums
    ) -> torch.Tensor:
        """`policy_loss` on `advantages` ``[b, s]``, importance-weighted against the sampler's
        log-probs unless ``loss.tis_cap`` is None (no correction: every weight is 1)."""
        correct = self.loss.tis_cap is not None
        loss, loss_metrics = policy_loss(
            logp,
            advantages,
            mb.loss_mask,
            sampler_logp=mb.sampler_logprobs if correct else None,
            tis_cap=self.loss.tis_cap,
            clip_eps=self.loss.clip_eps,
            agg=self.loss.agg,
            num_tokens=1,
        )
        if not correct:  # the engine-vs-trainer gap is worth watching even when not corrected for
            gap = (logp.detach().float() - mb.sampler_logprobs).abs()
            loss_metrics["sampler_logp_abs_diff"] = masked_mean(gap, mb.loss_mask)
        metrics.add_token_means(loss_metrics, mb.loss_mask.sum())
        return loss
