"""Full-vocabulary reverse KL from the student to the G-OPD target q ∝ pi_ref^(1-lam) * pi*^lam,
exact per token over vocab-parallel logits, with the gradient w.r.t. the student's logits only."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_gopd.logprobs.shared import (
    ProcessGroup,
    VocabShard,
    check_temperature,
    chunk_positions,
    global_log_norm,
    scaled_fp32,
    tp_all_reduce,
)


def _mixture_logits(
    teacher_chunk: torch.Tensor, ref_chunk: Optional[torch.Tensor], lam: float, temperature: float
) -> torch.Tensor:
    """Unnormalised log q = lam * z_teacher + (1 - lam) * z_ref: [cs, b, v] -> fresh fp32 [n, v].

    Per-token normalisers of log pi* and log pi_ref are constants over the vocabulary, so the
    log-softmax of this mixture of logits is exactly log q for q ∝ pi_ref^(1-lam) pi*^lam.
    """
    mixed = scaled_fp32(teacher_chunk, temperature)  # [n, v]
    if ref_chunk is None:
        return mixed
    mixed.mul_(lam)
    return mixed.add_(scaled_fp32(ref_chunk, temperature), alpha=1.0 - lam)


def _chunk_student_and_target(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    ref_logits: Optional[torch.Tensor],
    rows: slice,
    valid: int,
    lam: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised fp32 log pi_student and log q [n, v_valid] of sequence positions ``rows``."""
    log_p = scaled_fp32(student_logits[rows, :, :valid], temperature)  # [n, v_valid]
    log_q = _mixture_logits(
        teacher_logits[rows, :, :valid], None if ref_logits is None else ref_logits[rows, :, :valid], lam, temperature
    )  # [n, v_valid]
    return log_p, log_q


class _ReverseKLFromLogits(torch.autograd.Function):
    """Chunked, TP-exact KL(pi_student || q) per token; gradient w.r.t. the student logits only."""

    @staticmethod
    def forward(
        ctx,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        ref_logits: Optional[torch.Tensor],
        lam: float,
        tp_group: ProcessGroup,
        temperature: float,
        vocab_size: Optional[int],
        chunk_size: Optional[int],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        seq_len, batch, local_vocab = student_logits.shape  # [s, b, v/tp]
        shard = VocabShard(local_vocab, tp_group, vocab_size)
        step = chunk_positions(seq_len, batch, local_vocab, chunk_size)
        valid = shard.valid
        kl = student_logits.new_empty((seq_len, batch), dtype=torch.float32)  # [s, b]
        student_norm = torch.empty_like(kl)
        target_norm = torch.empty_like(kl)
        for s0 in range(0, seq_len, step):
            s1 = min(s0 + step, seq_len)
            rows = slice(s0, s1)
            log_p, log_q = _chunk_student_and_target(
                student_logits, teacher_logits, ref_logits, rows, valid, lam, temperature
            )
            chunk_student_norm = global_log_norm(log_p, tp_group)  # [n]
            chunk_target_norm = global_log_norm(log_q, tp_group)  # [n]
            log_p.sub_(chunk_student_norm[:, None])  # [n, v] log pi_student
            log_q.sub_(chunk_target_norm[:, None])  # [n, v] log q
            # KL = sum_j p_j (log p_j - log q_j); this shard's rows, then summed over TP.
            chunk_kl = log_q.neg_().add_(log_p).mul_(torch.exp(log_p)).sum(dim=1)
            tp_all_reduce(chunk_kl, dist.ReduceOp.SUM, tp_group)
            kl[rows] = chunk_kl.view(s1 - s0, batch)
            student_norm[rows] = chunk_student_norm.view(s1 - s0, batch)
            target_norm[rows] = chunk_target_norm.view(s1 - s0, batch)
        ctx.save_for_backward(student_logits, teacher_logits, ref_logits, kl, student_norm, target_norm)
        ctx.config = (lam, tp_group, temperature, vocab_size, step)
        ctx.set_materialize_grads(False)
        return kl

    @staticmethod
    def backward(ctx, grad_kl: Optional[torch.Tensor]):
        if grad_kl is None or not ctx.needs_input_grad[0]:
            return (None,) * 8
        (student_logits, teacher_logits, ref_logits, kl, student_norm, target_norm) = ctx.saved_tensors
        lam, tp_group, temperature, vocab_size, step = ctx.config
        seq_len, batch, local_vocab = student_logits.shape
        valid = VocabShard(local_vocab, tp_group, vocab_size).valid
        grad_student = torch.empty_like(student_logits)  # [s, b, v/tp]
        grad_student[..., valid:].zero_()  # padded rows get zero gradient
        for s0 in range(0, seq_len, step):
            s1 = min(s0 + step, seq_len)
            rows = slice(s0, s1)
            log_p, log_q = _chunk_student_and_target(
                student_logits, teacher_logits, ref_logits, rows, valid, lam, temperature
            )
            log_p.sub_(student_norm[rows].reshape(-1, 1))
            log_q.sub_(target_norm[rows].reshape(-1, 1))
            # dKL/dz_j = p_j (log p_j - log q_j - KL), times the upstream gradient and 1/T.
            scale = grad_kl[rows].reshape(-1, 1).float() / temperature
            grad = log_q.neg_().add_(log_p).sub_(kl[rows].reshape(-1, 1))
            grad.mul_(torch.exp(log_p)).mul_(scale)
            grad_student[rows, :, :valid] = grad.view(s1 - s0, batch, valid)
        return grad_student, None, None, None, None, None, None, None


def full_vocab_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    ref_logits: Optional[torch.Tensor],
    lam: float,
    *,
    tp_group: ProcessGroup = None,
    temperature: float = 1.0,
    vocab_size: Optional[int] = None,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Exact per-token KL(pi_student || q) over the full vocabulary, q ∝ pi_ref^(1-lam) * pi*^lam.

    The full-vocabulary form of the G-OPD objective (beyond the paper): its minimiser over the
    student is q itself, the same optimum as the sampled-token objective. Needs teacher and student
    to share the tokenizer and the TP vocabulary layout.

    Args:
        student_logits: ``[s, b, V/tp]`` the student's vocab-parallel logits (differentiable).
        teacher_logits: ``[s, b, V/tp]`` the teacher's logits at the same positions (no gradient).
        ref_logits: ``[s, b, V/tp]`` the reference model's logits, or ``None`` when ``lam == 1``
            (then q = pi*).
        lam: the reward scale lambda (1 = plain OPD, > 1 extrapolates).
        tp_group, temperature, vocab_size, chunk_size: as in `token_logprobs_from_logits`; the
            same temperature is applied to all three models.

    Returns:
        fp32 ``[s, b]`` per-token KL in nats; backward reaches ``student_logits`` only, chunk by
        chunk, with no communication beyond the forward's recomputation statistics.
    """
    check_temperature(temperature)
    if ref_logits is None and lam != 1.0:
        raise ValueError(f"ref_logits may be None only when lam == 1 (got lam={lam})")
    for name, other in (("teacher_logits", teacher_logits), ("ref_logits", ref_logits)):
        if other is not None and other.shape != student_logits.shape:
            raise ValueError(f"{name} {tuple(other.shape)} must match student_logits {tuple(student_logits.shape)}")
    if student_logits.dim() != 3:
        raise ValueError(f"logits must be [s, b, V/tp], got {tuple(student_logits.shape)}")
    if lam == 1.0:
        ref_logits = None  # q = pi*: the reference drops out exactly
    return _ReverseKLFromLogits.apply(
        student_logits,
        teacher_logits.detach(),
        None if ref_logits is None else ref_logits.detach(),
        float(lam),
        tp_group,
        float(temperature),
        vocab_size,
        chunk_size,
    )
