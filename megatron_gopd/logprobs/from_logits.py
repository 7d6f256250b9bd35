"""The logits path: target log-probs, entropy and the top-k of vocab-parallel logits [s, b, V/tp].

Used by samplers, scoring and tests; the logits and their gradient (same size, same dtype) exist,
but no fp32 copy of them does.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from megatron_gopd.logprobs.shared import (
    LogprobsOut,
    ProcessGroup,
    VocabShard,
    as_targets_3d,
    check_temperature,
    chunk_forward,
    chunk_grad_logits,
    chunk_positions,
    global_log_norm,
    scaled_fp32,
    tp_rank_and_size,
)


class _LogprobsFromLogits(torch.autograd.Function):
    """Chunked, TP-exact target log-probs and entropy from vocab-parallel logits [s, b, V/tp]."""

    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,
        targets: torch.Tensor,
        tp_group: ProcessGroup,
        temperature: float,
        vocab_size: Optional[int],
        chunk_size: Optional[int],
        with_entropy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        seq_len, batch, local_vocab = logits.shape  # [s, b, v/tp]
        k = targets.shape[2]  # targets: [s, b, k]
        shard = VocabShard(local_vocab, tp_group, vocab_size)
        step = chunk_positions(seq_len, batch, local_vocab, chunk_size)
        logp = logits.new_empty((seq_len, batch, k), dtype=torch.float32)  # [s, b, k]
        log_norm = logits.new_empty((seq_len, batch), dtype=torch.float32)  # [s, b]
        entropy = logits.new_empty((seq_len, batch) if with_entropy else (0,), dtype=torch.float32)
        for s0 in range(0, seq_len, step):
            s1 = min(s0 + step, seq_len)
            z = scaled_fp32(logits[s0:s1, :, : shard.valid], temperature)  # [n, v_valid]
            index, in_shard = shard.local_targets(targets[s0:s1].reshape(-1, k))
            chunk_logp, chunk_norm, chunk_entropy = chunk_forward(z, index, in_shard, tp_group, with_entropy)
            logp[s0:s1] = chunk_logp.view(s1 - s0, batch, k)
            log_norm[s0:s1] = chunk_norm.view(s1 - s0, batch)
            if with_entropy:
                entropy[s0:s1] = chunk_entropy.view(s1 - s0, batch)
        ctx.save_for_backward(logits, targets, log_norm, entropy)
        ctx.config = (tp_group, temperature, vocab_size, step, with_entropy)
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor]):
        logits, targets, log_norm, entropy = ctx.saved_tensors
        tp_group, temperature, vocab_size, step, with_entropy = ctx.config
        if not with_entropy:
            grad_entropy = None
        if grad_logp is None and grad_entropy is None:
            return (None,) * 7
        seq_len, batch, local_vocab = logits.shape
        k = targets.shape[2]
        shard = VocabShard(local_vocab, tp_group, vocab_size)
        grad_logits = torch.empty_like(logits)  # [s, b, v/tp]
        grad_logits[..., shard.valid :].zero_()  # padded rows get zero gradient
        for s0 in range(0, seq_len, step):
            s1 = min(s0 + step, seq_len)
            z = scaled_fp32(logits[s0:s1, :, : shard.valid], temperature)  # [n, v_valid]
            index, in_shard = shard.local_targets(targets[s0:s1].reshape(-1, k))
            grad_z = chunk_grad_logits(
                z,
                log_norm[s0:s1].reshape(-1),
                entropy[s0:s1].reshape(-1) if grad_entropy is not None else entropy,
                index,
                in_shard,
                None if grad_logp is None else grad_logp[s0:s1].reshape(-1, k).float(),
                None if grad_entropy is None else grad_entropy[s0:s1].reshape(-1).float(),
            )
            if temperature != 1.0:
                grad_z.div_(temperature)  # z = logits / T
            grad_logits[s0:s1, :, : shard.valid] = grad_z.view(s1 - s0, batch, shard.valid)
        return grad_logits, None, None, None, None, None, None


def token_logprobs_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    tp_group: ProcessGroup = None,
    temperature: float = 1.0,
    vocab_size: Optional[int] = None,
    chunk_size: Optional[int] = None,
    with_entropy: bool = False,
) -> LogprobsOut:
    """Log-probs of `targets` (and per-token entropy) under vocab-parallel logits.

    Args:
        logits: ``[s, b, V/tp]`` this TP rank's vocabulary shard of the logits, any float dtype
            (e.g. Megatron's bf16 ``output_layer`` output before any gather). Not modified.
        targets: ``[s, b]`` global token ids (the sampled token at each position), or ``[s, b, k]``
            for k targets per position (e.g. a teacher's top-k ids). Same on every TP rank.
        tp_group: the tensor-parallel group the vocabulary is split over; ``None`` for no TP.
        temperature: the softmax is taken over ``logits / temperature``.
        vocab_size: the real vocabulary size; padded rows beyond it are excluded (masked to -inf).
        chunk_size: tokens per chunk (see the module docstring); ``None`` picks a ~256 MiB chunk.
        with_entropy: also return the entropy of the (temperature-scaled, unpadded) distribution.

    Returns:
        fp32 log-probs ``[s, b]`` (``[s, b, k]`` for 3-d targets); with ``with_entropy`` a tuple
        ``(logprobs, entropy)`` with entropy ``[s, b]``. Both are differentiable w.r.t. ``logits``;
        the gradient is computed chunk by chunk in backward, and is local to each shard (no
        communication in backward).
    """
    check_temperature(temperature)
    if logits.dim() != 3:
        raise ValueError(f"logits must be [s, b, V/tp], got {tuple(logits.shape)}")
    targets_3d, has_k = as_targets_3d(targets, logits.shape[0], logits.shape[1])
    logp, entropy = _LogprobsFromLogits.apply(
        logits, targets_3d, tp_group, float(temperature), vocab_size, chunk_size, with_entropy
    )
    logp = logp if has_k else logp.squeeze(-1)
    return (logp, entropy) if with_entropy else logp


@torch.no_grad()
def topk_logprobs_from_logits(
    logits: torch.Tensor,
    k: int,
    *,
    tp_group: ProcessGroup = None,
    temperature: float = 1.0,
    vocab_size: Optional[int] = None,
    chunk_size: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` most likely tokens at every position of vocab-parallel logits, and their log-probs.

    Each TP rank takes the top-k of its own shard; one all-gather of ``k`` candidates per rank and a
    second top-k give the global answer, so no rank ever holds the full vocabulary.

    Args:
        logits: ``[s, b, V/tp]`` this TP rank's vocabulary shard (any float dtype). Not modified.
        k: how many tokens per position, ``1 <= k <= vocab_size``.
        tp_group, temperature, vocab_size, chunk_size: as in `token_logprobs_from_logits`.

    Returns:
        ``(logprobs, ids)``: fp32 ``[s, b, k]`` full-vocabulary log-softmax values (not renormalised
        over the k), in decreasing order, and int64 ``[s, b, k]`` global token ids; the same on
        every TP rank. Ties are broken by the lower shard (deterministic across TP sizes only up to
        exact ties).
    """
    check_temperature(temperature)
    if logits.dim() != 3:
        raise ValueError(f"logits must be [s, b, V/tp], got {tuple(logits.shape)}")
    seq_len, batch, local_vocab = logits.shape
    shard = VocabShard(local_vocab, tp_group, vocab_size)
    _, tp_size = tp_rank_and_size(tp_group)
    total_vocab = vocab_size if vocab_size is not None else local_vocab * tp_size
    if not 1 <= k <= total_vocab:
        raise ValueError(f"k must be in [1, {total_vocab}] (the vocabulary), got {k}")
    local_k = min(k, shard.valid)
    step = chunk_positions(seq_len, batch, local_vocab, chunk_size)
    values = logits.new_empty((seq_len, batch, k), dtype=torch.float32)
    ids = torch.empty((seq_len, batch, k), dtype=torch.int64, device=logits.device)
    for s0 in range(0, seq_len, step):
        s1 = min(s0 + step, seq_len)
        z = scaled_fp32(logits[s0:s1, :, : shard.valid], temperature)  # [n, v_valid]
        log_norm = global_log_norm(z, tp_group)  # [n]
        # Every shard offers exactly k candidates (-inf fillers where it has fewer real rows).
        cand_values = z.new_full((z.shape[0], k), -math.inf)
        cand_ids = torch.zeros((z.shape[0], k), dtype=torch.int64, device=z.device)
        if local_k:
            top = z.topk(local_k, dim=1)
            cand_values[:, :local_k] = top.values
            cand_ids[:, :local_k] = top.indices + shard.start
        if tp_size > 1:
            gathered_values = [torch.empty_like(cand_values) for _ in range(tp_size)]
            gathered_ids = [torch.empty_like(cand_ids) for _ in range(tp_size)]
            dist.all_gather(gathered_values, cand_values, group=tp_group)
            dist.all_gather(gathered_ids, cand_ids, group=tp_group)
            cand_values, cand_ids = torch.cat(gathered_values, dim=1), torch.cat(gathered_ids, dim=1)
            top = cand_values.topk(k, dim=1)
            cand_values, cand_ids = top.values, cand_ids.gather(1, top.indices)
        values[s0:s1] = (cand_values - log_norm[:, None]).view(s1 - s0, batch, k)
        ids[s0:s1] = cand_ids.view(s1 - s0, batch, k)
    return values, ids
