"""The G-OPD objective as pure functions on tensors: advantages, policy loss, full-vocab / top-k KL.

What the trainer wires together each micro-batch::

    student_logp = token_logprobs_from_hidden(hidden, output_weight, tokens,   # [s, b]
                                              tp_group=tp_group).t()            # -> [b, s]
    adv = gopd_advantages(student_logp, teacher_logp, ref_logp, lam)           # detached
    loss, metrics = policy_loss(student_logp, adv, mask, sampler_logp, tis_cap=5.0,
                                num_tokens=1)  # with calculate_per_token_loss, see below

Layout: every function in this module takes batch-major ``[b, s]`` tensors (one row per response,
one column per response position; the top-k functions add a trailing ``[..., k]``). The log-prob
kernels in `megatron_gopd.logprobs` work in Megatron's sequence-major ``[s, b]`` layout; transpose
their outputs with ``.t()``. All four log-prob tensors of one token position must refer to the same
sampled token ``y_t``.

``mask`` is a ``[b, s]`` bool (or 0/1 float) tensor: 1 on response tokens that are trained on. Build
it from response lengths, never from ``token != pad_id``: Qwen3's pad id (151643) is also one of its
EOS ids, and the real EOS must be trained on.

Normalisation under micro-batching and data parallelism (``num_tokens``): the loss of one
micro-batch is ``numerator / num_tokens``, where the numerator is the sum of per-token losses
(``token-mean``, ``seq-mean-token-sum``) or of per-sequence mean losses (``seq-mean-token-mean``)
and ``num_tokens`` is the step's *global* normaliser: the sum of `loss_normaliser(mask, agg)` (a
token count for ``token-mean``, a sequence count for the ``seq-mean-*`` modes) over every
micro-batch of the optimizer step on every data-parallel rank. Then the per-micro-batch losses (and
their gradients) *sum* to exactly the full-batch loss. Two ways to wire this into Megatron:

* ``calculate_per_token_loss=True`` (recommended): pass ``num_tokens=1`` so the loss is the
  micro-batch's numerator, and return ``loss_normaliser(mask, agg)`` as the loss function's token
  count; Megatron sums both over micro-batches and DP ranks and divides the gradients by the total
  (``finalize_model_grads``).
* otherwise: pass the global normaliser (computed before the step) and multiply the loss by
  ``num_microbatches * dp_size`` to undo Megatron's averaging over micro-batches and DP ranks.

Without ``num_tokens`` the micro-batch's own normaliser is used (right for a single micro-batch on a
single rank only).

Metrics are returned as 0-dim detached fp32 tensors (no device sync); they are means over this
micro-batch's masked tokens, to be averaged by the trainer.

The full-vocabulary variant `full_vocab_reverse_kl` is implemented beside the other vocab-parallel
kernels in `megatron_gopd.logprobs` and re-exported here (as are `token_logprobs_from_hidden` and
`token_logprobs_from_logits`); `topk_reverse_kl` is its top-k form with a tail bucket. Both give
per-token losses that `aggregate_loss` turns into a step loss with the same ``agg`` /
``num_tokens`` rules as `policy_loss`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch

# The vocab-parallel kernels live in megatron_gopd.logprobs; the ones a loss function calls are
# re-exported.
from megatron_gopd.logprobs import (
    full_vocab_reverse_kl,
    token_logprobs_from_hidden,
    token_logprobs_from_logits,
)

__all__ = [
    "LOGPROB_FLOOR",
    "AggMode",
    "AGG_MODES",
    "GOPDAdvantages",
    "gopd_advantages",
    "gopd_advantages_detailed",
    "policy_loss",
    "loss_normaliser",
    "aggregate_loss",
    "full_vocab_reverse_kl",
    "topk_reverse_kl",
    "token_logprobs_from_hidden",
    "token_logprobs_from_logits",
    "masked_mean",
]

AggMode = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]
AGG_MODES: tuple[str, ...] = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
Count = Union[int, float, torch.Tensor]

# Teacher / reference log-probs below this many nats (prob ~2e-22), -inf or NaN are replaced by it.
# A teacher that gives a sampled token ~zero probability (e.g. a vocabulary it masks) would
# otherwise give an infinite advantage. A token the student actually sampled practically never
# scores below -50 under a teacher with finite logits, so the floor only touches broken values;
# it bounds the reward term at about |lam| * 50 nats. +inf (impossible for a log-prob) is replaced
# by 0. Every replacement is counted in the metrics.
LOGPROB_FLOOR = -50.0

# Top-k tail buckets: the mass outside the top-k is floored at this, so that log(tail) stays finite
# when the top-k covers (numerically) all of the probability.
TAIL_MASS_FLOOR = 1e-6


# ----------------------------------------------------------------------------------------------
# Small helpers


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask`` (0-dim fp32); 0 for an empty mask; off-mask NaN ignored."""
    keep = mask.bool()
    total = torch.where(keep, values.float(), 0.0).sum()
    return total / keep.sum().clamp(min=1)


def _guard_logp(logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 log-probs with NaN, -inf, < floor -> LOGPROB_FLOOR and +inf -> 0; mask of changes)."""
    logp = logp.detach().float()
    broken = torch.isnan(logp) | (logp < LOGPROB_FLOOR) | torch.isposinf(logp)
    guarded = torch.nan_to_num(logp, nan=LOGPROB_FLOOR, posinf=0.0, neginf=LOGPROB_FLOOR)
    return guarded.clamp(min=LOGPROB_FLOOR), broken


def _check_same_shape(**tensors: Optional[torch.Tensor]) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch: {shapes}")


# ----------------------------------------------------------------------------------------------
# Advantages


@dataclass(frozen=True)
class GOPDAdvantages:
    """Per-token G-OPD advantages and what went into them, all ``[b, s]`` fp32, detached.

    Attributes:
        advantages: ``lam * (teacher - ref) - (student - ref)`` with the teacher / reference
            log-probs guarded (see `LOGPROB_FLOOR`).
        reverse_kl: ``student - teacher`` per sampled token: its mean is the sampled-token estimate
            of KL(pi_student || pi_teacher).
        implicit_reward: ``teacher - ref`` (the reward the student is trained on, before ``lam``);
            ``None`` when no reference was given.
        teacher_clamped: bool, where the teacher's log-prob was NaN / inf / below the floor.
        ref_clamped: the same for the reference; ``None`` when no reference was given.
    """

    advantages: torch.Tensor
    reverse_kl: torch.Tensor
    implicit_reward: Optional[torch.Tensor]
    teacher_clamped: torch.Tensor
    ref_clamped: Optional[torch.Tensor]

    def metrics(self, mask: torch.Tensor, entropy: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Masked means (and clamp counts) over this micro-batch's response tokens.

        Args:
            mask: ``[b, s]`` response-token mask.
            entropy: optional ``[b, s]`` student entropy (``with_entropy=True`` from the log-prob
                kernels, transposed) to report its mean.

        Returns:
            ``advantage_mean``, ``reverse_kl_sampled`` (mean of student - teacher),
            ``implicit_reward_mean`` (mean of teacher - ref; only with a reference),
            ``entropy_mean`` (only with ``entropy``), and the token counts
            ``teacher_logp_clamped`` / ``ref_logp_clamped`` (masked tokens whose log-prob was
            replaced; the latter only with a reference).
        """
        keep = mask.bool()
        out = {
            "advantage_mean": masked_mean(self.advantages, keep),
            "reverse_kl_sampled": masked_mean(self.reverse_kl, keep),
            "teacher_logp_clamped": (self.teacher_clamped & keep).sum().float(),
        }
        if self.implicit_reward is not None:
            out["implicit_reward_mean"] = masked_mean(self.implicit_reward, keep)
        if self.ref_clamped is not None:
            out["ref_logp_clamped"] = (self.ref_clamped & keep).sum().float()
        if entropy is not None:
            out["entropy_mean"] = masked_mean(entropy.detach(), keep)
        return out


def gopd_advantages_detailed(
    student_logp: torch.Tensor,
    teacher_logp: torch.Tensor,
    ref_logp: Optional[torch.Tensor],
    lam: float,
) -> GOPDAdvantages:
    """`gopd_advantages` plus the per-token quantities the step's metrics are made of.

    Same arguments and rules as `gopd_advantages`; see `GOPDAdvantages` for the fields.
    """
    if ref_logp is None and lam != 1.0:
        raise ValueError(
            f"ref_logp may be None only when lam == 1 (plain OPD); got lam={lam}. Score the "
            "reference model (the student's initial weights, or the teacher's pre-RL base for "
            "reward correction) and pass its log-probs of the sampled tokens."
        )
    _check_same_shape(student_logp=student_logp, teacher_logp=teacher_logp, ref_logp=ref_logp)
    student = student_logp.detach().float()
    teacher, teacher_clamped = _guard_logp(teacher_logp)
    if ref_logp is None:
        ref, ref_clamped, implicit_reward = None, None, None
    else:
        ref, ref_clamped = _guard_logp(ref_logp)
        implicit_reward = teacher - ref
    if lam == 1.0:
        # pi_ref drops out; computed directly so that lam = 1 is exactly teacher - student.
        advantages = teacher - student
    else:
        assert ref is not None and implicit_reward is not None
        advantages = lam * implicit_reward - (student - ref)
    return GOPDAdvantages(
        advantages=advantages,
        reverse_kl=student - teacher,
        implicit_reward=implicit_reward,
        teacher_clamped=teacher_clamped,
        ref_clamped=ref_clamped,
    )


def gopd_advantages(
    student_logp: torch.Tensor,
    teacher_logp: torch.Tensor,
    ref_logp: Optional[torch.Tensor],
    lam: float,
) -> torch.Tensor:
    """Per-token G-OPD advantages ``lam * (teacher - ref) - (student - ref)``, detached fp32.

    Args:
        student_logp: ``[b, s]`` the student's log-probs of the sampled tokens (train numerics).
        teacher_logp: ``[b, s]`` the teacher's log-probs of the same tokens. NaN, -inf and values
            below `LOGPROB_FLOOR` are replaced by the floor (+inf by 0); use
            `gopd_advantages_detailed` to count them.
        ref_logp: ``[b, s]`` the reference model's log-probs (the student's initial weights, or the
            teacher's pre-RL base for reward correction); may be ``None`` only when ``lam == 1``.
            Guarded like ``teacher_logp``.
        lam: the reward scale of this prompt's teacher: 1 = OPD, in (0, 1) interpolates, > 1
            extrapolates (ExOPD). With ``lam == 1`` the result is exactly ``teacher - student``
            whether or not ``ref_logp`` is given.

    Raises:
        ValueError: ``ref_logp`` is None with ``lam != 1``, or the shapes differ.
    """
    return gopd_advantages_detailed(student_logp, teacher_logp, ref_logp, lam).advantages


# ----------------------------------------------------------------------------------------------
# Aggregation


def _check_agg(agg: str) -> None:
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")


def loss_normaliser(mask: torch.Tensor, agg: AggMode = "token-mean") -> torch.Tensor:
    """This micro-batch's share of ``num_tokens`` for ``agg`` (0-dim fp32).

    ``token-mean``: the number of masked tokens. ``seq-mean-*``: the number of sequences with at
    least one masked token (empty rows, e.g. padding rows of a micro-batch, do not count). Sum it
    over every micro-batch of the step and all-reduce it over data-parallel ranks to get the
    ``num_tokens`` of `policy_loss` / `aggregate_loss`.
    """
    _check_agg(agg)
    keep = mask.bool()
    if agg == "token-mean":
        return keep.sum().float()
    return keep.any(dim=-1).sum().float()


def aggregate_loss(
    per_token_loss: torch.Tensor, mask: torch.Tensor, agg: AggMode = "token-mean", num_tokens: Optional[Count] = None
) -> torch.Tensor:
    """Reduce a ``[b, s]`` per-token loss to this micro-batch's share of the step loss (0-dim).

    Args:
        per_token_loss: ``[b, s]`` loss per token (values off the mask are ignored, even NaN).
        mask: ``[b, s]`` response-token mask.
        agg: ``token-mean``: sum over all masked tokens / number of tokens (the paper's);
            ``seq-mean-token-sum``: per-sequence sum, mean over sequences;
            ``seq-mean-token-mean``: per-sequence mean, mean over sequences. A sequence must not be
            split across micro-batches in the seq-mean modes.
        num_tokens: the step's global `loss_normaliser` (see the module docstring); ``None`` uses
            this micro-batch's own.
    """
    _check_agg(agg)
    keep = mask.bool()
    per_token = torch.where(keep, per_token_loss.float(), 0.0)
    if agg == "seq-mean-token-mean":
        seq_len = keep.sum(dim=-1).clamp(min=1)  # [b]
        total = (per_token.sum(dim=-1) / seq_len).sum()  # sum over sequences of their means
    else:
        # token-mean and seq-mean-token-sum share the numerator; only the normaliser differs.
        total = per_token.sum()
    if num_tokens is None:
        num_tokens = loss_normaliser(keep, agg).clamp(min=1)
    elif not isinstance(num_tokens, torch.Tensor) and num_tokens <= 0:
        raise ValueError(f"num_tokens must be > 0, got {num_tokens}")
    return total / num_tokens


# ----------------------------------------------------------------------------------------------
# Policy loss


def policy_loss(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    sampler_logp: Optional[torch.Tensor] = None,
    tis_cap: Optional[float] = None,
    clip_eps: Optional[float] = None,
    agg: AggMode = "token-mean",
    *,
    old_logp: Optional[torch.Tensor] = None,
    num_tokens: Optional[Count] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """REINFORCE with dense per-token advantages, truncated importance weights, optional clipping.

    Per token (all ``[b, s]``), with ``base = old_logp`` if given, else ``logp.detach()``:

    * importance weight ``w = min(exp(base - sampler_logp), tis_cap)`` (detached; 1 without
      ``sampler_logp``; untruncated if ``tis_cap`` is None). It corrects for the rollout engine's
      numerics: the tokens were drawn from the sampler, the gradient is the trainer's.
    * without ``old_logp`` and ``clip_eps`` (each rollout batch feeds one optimizer step, the
      paper's setting): ``loss_t = -w * A * logp``.
    * otherwise, PPO-style with ratio ``r = exp(logp - base)``:
      ``loss_t = -w * min(r * A, clip(r, 1 - clip_eps, 1 + clip_eps) * A)`` (no ``min`` / ``clip``
      without ``clip_eps``). With ``old_logp = logp.detach()`` this has the same gradient as the
      REINFORCE form.

    Args:
        logp: ``[b, s]`` the student's log-probs of the sampled tokens, with gradient.
        advantages: ``[b, s]`` from `gopd_advantages` (detached here anyway).
        mask: ``[b, s]`` response-token mask.
        sampler_logp: ``[b, s]`` the rollout engine's log-probs of the same tokens.
        tis_cap: truncation C of the importance weight (the paper: 5.0); needs ``sampler_logp``.
        clip_eps: PPO clip range, for a batch reused for several optimizer steps.
        agg: aggregation mode, see `aggregate_loss`.
        old_logp: ``[b, s]`` the student's log-probs when the batch was scored (before this
            batch's first update); the base of the ratio and the importance weight.
        num_tokens: the step's global normaliser, see the module docstring and `loss_normaliser`.

    Returns:
        ``(loss, metrics)``: the 0-dim loss of this micro-batch (its share of the step loss) and
        masked-mean metrics ``advantage_mean``; with ``sampler_logp``: ``is_weight_mean``,
        ``is_truncated_frac`` (tokens whose weight hit ``tis_cap``), ``sampler_logp_abs_diff``
        (mean |train - sampler| log-prob gap: bf16 logits differ by ~0.1 per token between
        engines, so it is worth watching every step); with a ratio: ``ratio_mean`` and
        ``clip_frac`` (tokens where the clipped branch is active).

    Raises:
        ValueError: bad ``agg``, shapes, ``tis_cap`` without ``sampler_logp``, or non-positive
            ``tis_cap`` / ``clip_eps``.
    """
    _check_agg(agg)
    _check_same_shape(logp=logp, advantages=advantages, mask=mask, sampler_logp=sampler_logp, old_logp=old_logp)
    if tis_cap is not None and (sampler_logp is None or tis_cap <= 0):
        raise ValueError(
            "tis_cap needs sampler_logp and must be > 0 "
            f"(tis_cap={tis_cap}, sampler_logp given: {sampler_logp is not None})"
        )
    if clip_eps is not None and clip_eps <= 0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps}")

    keep = mask.bool()
    logp = logp.float()
    adv = advantages.detach().float()
    base = logp.detach() if old_logp is None else old_logp.detach().float()
    metrics: dict[str, torch.Tensor] = {"advantage_mean": masked_mean(adv, keep)}

    weight = torch.ones_like(adv)
    if sampler_logp is not None:
        log_gap = base - sampler_logp.detach().float()  # [b, s] log(pi_train / pi_sampler)
        weight = torch.exp(log_gap)
        if tis_cap is not None:
            truncated = weight > tis_cap
            weight = weight.clamp(max=tis_cap)
            metrics["is_truncated_frac"] = masked_mean(truncated, keep)
        metrics["is_weight_mean"] = masked_mean(weight, keep)
        metrics["sampler_logp_abs_diff"] = masked_mean(log_gap.abs(), keep)

    if old_logp is None and clip_eps is None:
        per_token = -(weight * adv * logp)
    else:
        ratio = torch.exp(logp - base)  # [b, s], 1 in value on a batch's first pass
        surrogate = ratio * adv
        if clip_eps is not None:
            clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv
            metrics["clip_frac"] = masked_mean((clipped < surrogate).detach(), keep)
            surrogate = torch.minimum(surrogate, clipped)
        metrics["ratio_mean"] = masked_mean(ratio.detach(), keep)
        per_token = -(weight * surrogate)

    loss = aggregate_loss(per_token, keep, agg, num_tokens)
    return loss, metrics


# ----------------------------------------------------------------------------------------------
# Top-k reverse KL with a tail bucket


def _log_tail_mass(topk_logp: torch.Tensor) -> torch.Tensor:
    """log(1 - sum_k p_k) for ``[..., k]`` log-probs, the mass floored at `TAIL_MASS_FLOOR`."""
    log_covered = torch.logsumexp(topk_logp, dim=-1).clamp(max=math.log1p(-TAIL_MASS_FLOOR))
    # log(1 - e^x), stable on both sides of x = -log 2 (Maechler's log1mexp).
    return torch.where(
        log_covered > -math.log(2.0), torch.log(-torch.expm1(log_covered)), torch.log1p(-torch.exp(log_covered))
    )


def _with_tail(topk_logp: torch.Tensor) -> torch.Tensor:
    """``[..., k]`` log-probs -> ``[..., k + 1]`` with the tail bucket's log-mass appended."""
    return torch.cat([topk_logp, _log_tail_mass(topk_logp).unsqueeze(-1)], dim=-1)


def topk_reverse_kl(
    student_topk_logp: torch.Tensor,
    teacher_topk_logp: torch.Tensor,
    ref_topk_logp: Optional[torch.Tensor],
    lam: float,
) -> torch.Tensor:
    """Per-token KL(pi_student || q) over the teacher's top-k tokens plus one tail bucket.

    Each distribution is reduced to ``k + 1`` outcomes: the teacher's top-k tokens and "anything
    else" (mass ``1 - sum of the top-k``, floored at `TAIL_MASS_FLOOR`). The target is
    ``q ∝ ref^(1-lam) * teacher^lam`` on those outcomes, normalised. With ``k`` = the whole
    vocabulary this equals `full_vocab_reverse_kl` (up to the floor); with ``lam == 1`` it is a
    lower bound on it (merging outcomes cannot increase a KL).

    Where the optimum lies for ``k < V`` and ``lam != 1``: the tail bucket's target weight is
    ``S_hat = (teacher tail mass)^lam * (ref tail mass)^(1-lam)``, not the G-OPD target's exact
    ``S = sum over tail tokens of teacher^lam * ref^(1-lam)`` (that needs both models' full
    distributions at the same positions, which are scored by different models, possibly on other
    ranks). The minimiser then gives every top-k token the G-OPD target's log-prob shifted by one
    common offset ``c = log((W + S) / (W + S_hat))`` (``W`` the top-k tokens' target weight):
    ratios within the top-k are exact, ``|c| <= |S - S_hat| / W``, and by Hoelder's inequality
    ``c <= 0`` for ``0 <= lam <= 1`` and ``c >= 0`` for ``lam > 1``. ``c`` vanishes with the
    tail: on LM-like draws (40 tokens, top-8, 5-20% of the teacher's mass outside it, the
    reference a perturbed teacher) it was 0.002-0.014 nats at lam 1.25 and 0.005-0.03 at lam 1.5
    (tests/test_topk_optimum.py checks the minimiser, the offset and the bound); with ``lam == 1``
    or ``k >= V`` it is 0.

    Args:
        student_topk_logp: ``[..., k]`` the student's log-probs of the teacher's top-k token ids,
            with gradient: ``token_logprobs_from_hidden(..., targets=teacher_topk_ids)`` (3-d
            targets), transposed to ``[b, s, k]``.
        teacher_topk_logp: ``[..., k]`` the teacher's top-k log-probs (full-vocabulary log-softmax
            values, not renormalised over the k).
        ref_topk_logp: ``[..., k]`` the reference model's log-probs of the same ids; ``None`` only
            when ``lam == 1``.
        lam: the reward scale lambda.

    Returns:
        fp32 ``[...]`` per-token KL (differentiable w.r.t. ``student_topk_logp``); reduce it with
        `aggregate_loss`.
    """
    if ref_topk_logp is None and lam != 1.0:
        raise ValueError(f"ref_topk_logp may be None only when lam == 1 (got lam={lam})")
    _check_same_shape(
        student_topk_logp=student_topk_logp, teacher_topk_logp=teacher_topk_logp, ref_topk_logp=ref_topk_logp
    )
    student = _with_tail(student_topk_logp.float())  # [..., k + 1]
    target = _with_tail(_guard_logp(teacher_topk_logp)[0])
    if lam != 1.0:
        assert ref_topk_logp is not None
        target = lam * target + (1.0 - lam) * _with_tail(_guard_logp(ref_topk_logp)[0])
    log_q = torch.log_softmax(target, dim=-1)  # [..., k + 1] normalised target
    return (torch.exp(student) * (student - log_q)).sum(dim=-1)
