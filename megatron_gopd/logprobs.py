"""Vocab-parallel token log-probs, entropy and full-vocabulary reverse KL, memory-bounded.

Every model in a G-OPD step (student, teachers, reference) ends in an LM head whose output is split
over the tensor-parallel (TP) group along the vocabulary: TP rank r holds the contiguous rows
``[r * V/tp, (r + 1) * V/tp)`` of the (padded) vocabulary. This module turns such a head into
per-token log-probs of given target tokens, per-token entropies and, for the full-vocabulary
distillation variant, the exact per-token reverse KL to the G-OPD target distribution, without
ever holding a full-vocabulary fp32 tensor for the whole sequence:

* the sequence is processed in chunks of about ``chunk_size`` tokens, each chunk in fp32;
* exact softmax statistics across shards come from one max and one sum all-reduce per chunk over
  ``tp_group`` (``None`` means no tensor parallelism);
* custom ``torch.autograd.Function``s save only per-token statistics ([s, b] tensors) and recompute
  each chunk's logits in backward.

Two entry points per quantity:

* ``*_from_logits``: the input is the vocab-parallel logits ``[s, b, V/tp]`` (any float dtype). Used
  by samplers and tests; the logits and their gradient (same size, same dtype) exist, but no fp32
  copy of them does.
* ``token_logprobs_from_hidden``: the path that scales (shared/pitfalls.md): the input is the final
  hidden states ``[s, b, h]`` (full, identical on every TP rank) and the vocab-parallel output
  weight ``[V/tp, h]`` (``model.shared_embedding_or_output_weight()`` when embeddings are tied).
  The logits only ever exist one chunk at a time; backward accumulates the weight gradient chunk
  by chunk and all-reduces the hidden-state gradient over TP, because each rank only sees its
  vocabulary shard.

Conventions shared by every function here:

* Layout is Megatron's sequence-major ``[s, b, ...]``; outputs are ``[s, b]`` (or ``[s, b, k]`` for
  ``k`` targets per token), always fp32.
* ``temperature`` divides the logits before the softmax (``z / T``), as the sampler does.
* ``vocab_size`` is the real (unpadded) vocabulary. Megatron pads the vocabulary to a multiple of
  ``make_vocab_size_divisible_by * tp``; rows at or beyond ``vocab_size`` are excluded from every
  softmax, which is the same as masking them to -inf, and receive zero gradient. Targets must lie in
  ``[0, vocab_size)``; a target in the padding is not detected (checking would cost a device sync).
* ``chunk_size`` is a number of tokens (``s * b`` positions) per chunk, rounded down to whole
  sequence positions (at least one). ``None`` picks chunks of about ``DEFAULT_CHUNK_ELEMENTS`` fp32
  logits, i.e. ~256 MiB per chunk-sized temporary; a chunk needs two or three such temporaries.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.distributed as dist

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "token_logprobs_from_logits",
    "token_logprobs_from_hidden",
    "full_vocab_reverse_kl",
    "topk_logprobs_from_logits",
]

ProcessGroup = Optional[dist.ProcessGroup]
LogprobsOut = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]

# fp32 logits per chunk when chunk_size is None: 2**26 floats = 256 MiB per chunk-sized temporary
# (~440 tokens at V = 151,936 and TP = 1). Far smaller chunks cost time on CPU, where every chunk's
# matmul re-reads (and BLAS re-packs) the whole [V/tp, h] weight.
DEFAULT_CHUNK_ELEMENTS = 2**26


# ----------------------------------------------------------------------------------------------
# Tensor-parallel helpers


def _tp_rank_and_size(tp_group: ProcessGroup) -> tuple[int, int]:
    if tp_group is None:
        return 0, 1
    return dist.get_rank(group=tp_group), dist.get_world_size(group=tp_group)


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp, tp_group: ProcessGroup) -> None:
    """In-place all-reduce over the TP group; a no-op without TP (or with a group of one)."""
    if tp_group is not None and dist.get_world_size(group=tp_group) > 1:
        dist.all_reduce(tensor, op=op, group=tp_group)


class _VocabShard:
    """Where this rank's vocabulary shard sits, and which of its rows are real (not padding)."""

    def __init__(self, local_vocab: int, tp_group: ProcessGroup, vocab_size: Optional[int]) -> None:
        tp_rank, tp_size = _tp_rank_and_size(tp_group)
        padded_vocab = local_vocab * tp_size
        if vocab_size is None:
            vocab_size = padded_vocab
        if not 0 < vocab_size <= padded_vocab:
            raise ValueError(
                f"vocab_size={vocab_size} must be in (0, {padded_vocab}] "
                f"(local vocab {local_vocab} x tp {tp_size})")
        self.start = tp_rank * local_vocab
        # Rows [0, valid) of the local shard are real tokens; the rest is Megatron's padding.
        self.valid = max(0, min(local_vocab, vocab_size - self.start))

    def local_targets(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global target ids [n, k] -> (local column [n, k], clamped into range; in-shard mask)."""
        local = targets - self.start
        in_shard = (local >= 0) & (local < self.valid)
        return local.clamp(0, max(self.valid - 1, 0)), in_shard


# ----------------------------------------------------------------------------------------------
# Per-chunk math shared by every path. `z` is a fresh fp32 scratch tensor of temperature-scaled
# logits [n, v_valid] for the real (unpadded) rows of this rank's shard; functions may overwrite it.


def _global_max(z: torch.Tensor, tp_group: ProcessGroup) -> torch.Tensor:
    # [n] max over the whole vocabulary: the common shift that keeps exp() finite on every shard.
    if z.shape[1] == 0:  # a shard made only of padding
        row_max = z.new_full((z.shape[0],), -math.inf)
    else:
        row_max = z.amax(dim=1)
    _all_reduce(row_max, dist.ReduceOp.MAX, tp_group)
    return row_max


def _gather_targets(z: torch.Tensor, index: torch.Tensor, in_shard: torch.Tensor) -> torch.Tensor:
    # [n, k] target logits held by this shard, 0 where another shard holds the target.
    if z.shape[1] == 0:
        return z.new_zeros(index.shape)
    return torch.where(in_shard, z.gather(1, index), 0.0)


def _chunk_forward(
    z: torch.Tensor, index: torch.Tensor, in_shard: torch.Tensor, tp_group: ProcessGroup,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probs of the targets [n, k], log-normaliser [n] and entropy [n] (empty if not asked)."""
    target_logits = _gather_targets(z, index, in_shard)  # [n, k]
    row_max = _global_max(z, tp_group)  # [n]
    shifted = z.sub_(row_max[:, None])  # [n, v] z - max, in place: z is scratch
    exp_shifted = torch.exp(shifted)  # [n, v]
    # One SUM all-reduce carries sum(exp), the target logits and (if asked) sum(exp * shifted).
    # Target logits are summed raw: the shard holding a target contributes it, the others 0.
    columns = [exp_shifted.sum(dim=1, keepdim=True), target_logits]
    if with_entropy:
        columns.append(exp_shifted.mul_(shifted).sum(dim=1, keepdim=True))
    stats = torch.cat(columns, dim=1)  # [n, 1 + k (+ 1)]
    _all_reduce(stats, dist.ReduceOp.SUM, tp_group)
    k = index.shape[1]
    log_sum_exp = torch.log(stats[:, 0])  # [n] log sum exp(z - max)
    log_norm = row_max + log_sum_exp  # [n] logsumexp(z)
    logp = stats[:, 1:1 + k] - log_norm[:, None]  # [n, k]
    if with_entropy:
        # H = logsumexp(z) - E_p[z] = log_sum_exp - E_p[z - max]
        entropy = log_sum_exp - stats[:, 1 + k] / stats[:, 0]
    else:
        entropy = z.new_empty(0)
    return logp, log_norm, entropy


def _chunk_grad_logits(
    z: torch.Tensor, log_norm: torch.Tensor, entropy: torch.Tensor, index: torch.Tensor,
    in_shard: torch.Tensor, grad_logp: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor],
) -> torch.Tensor:
    """d(loss)/dz [n, v] for one chunk, written into `z`'s storage.

    d log p_t / dz_j = 1[j = t] - p_j;  dH / dz_j = -p_j (log p_j + H).
    """
    log_p = z.sub_(log_norm[:, None])  # [n, v] log p_j (this shard's rows)
    p = torch.exp(log_p)  # [n, v]
    if grad_entropy is not None:
        grad = log_p.add_(entropy[:, None]).mul_(p).mul_(-grad_entropy[:, None])
        if grad_logp is not None:
            grad.sub_(p.mul_(grad_logp.sum(dim=1, keepdim=True)))
    else:
        assert grad_logp is not None
        grad = p.mul_(-grad_logp.sum(dim=1, keepdim=True))
    if grad_logp is not None and grad.shape[1] > 0:
        grad.scatter_add_(1, index, torch.where(in_shard, grad_logp, 0.0))
    return grad


def _chunk_positions(seq_len: int, batch: int, local_vocab: int, chunk_size: Optional[int]) -> int:
    """Sequence positions per chunk: about `chunk_size` tokens (s * b), at least one position."""
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_ELEMENTS // max(local_vocab, 1))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return max(1, min(seq_len, chunk_size // max(batch, 1)))


def _scaled_fp32(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits chunk [cs, b, v] (any dtype, any strides) -> a fresh fp32 [cs * b, v] of x / T.

    One copy that converts and compacts at once; never a view of `x`, since callers overwrite it.
    """
    z = torch.empty(x.shape, dtype=torch.float32, device=x.device)  # contiguous [cs, b, v]
    z.copy_(x)
    if temperature != 1.0:
        z.div_(temperature)
    return z.view(x.shape[0] * x.shape[1], x.shape[2])  # not -1: a padding-only shard has v = 0


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _targets_3d(targets: torch.Tensor, seq_len: int, batch: int) -> tuple[torch.Tensor, bool]:
    """Targets [s, b] or [s, b, k] -> ([s, b, k] int64, whether there was a k dimension)."""
    if targets.shape[:2] != (seq_len, batch) or targets.dim() not in (2, 3):
        raise ValueError(f"targets must be [s, b] or [s, b, k] with s, b = {seq_len}, {batch}; "
                         f"got {tuple(targets.shape)}")
    has_k = targets.dim() == 3
    return (targets if has_k else targets.unsqueeze(-1)).long(), has_k


# ----------------------------------------------------------------------------------------------
# Logits path


class _LogprobsFromLogits(torch.autograd.Function):
    """Chunked, TP-exact target log-probs and entropy from vocab-parallel logits [s, b, V/tp]."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, tp_group: ProcessGroup,
                temperature: float, vocab_size: Optional[int], chunk_size: Optional[int],
                with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        seq_len, batch, local_vocab = logits.shape  # [s, b, v/tp]
        k = targets.shape[2]  # targets: [s, b, k]
        shard = _VocabShard(local_vocab, tp_group, vocab_size)
        step = _chunk_positions(seq_len, batch, local_vocab, chunk_size)
        logp = logits.new_empty((seq_len, batch, k), dtype=torch.float32)  # [s, b, k]
        log_norm = logits.new_empty((seq_len, batch), dtype=torch.float32)  # [s, b]
        entropy = logits.new_empty((seq_len, batch) if with_entropy else (0,), dtype=torch.float32)
        for s0 in range(0, seq_len, step):
            s1 = min(s0 + step, seq_len)
            z = _scaled_fp32(logits[s0:s1, :, :shard.valid], temperature)  # [n, v_valid]
            index, in_shard = shard.local_targets(targets[s0:s1].reshape(-1, k))
            chunk_logp, chunk_norm, chunk_entropy = _chunk_forward(
                z, index, in_shard, tp_group, with_entropy)
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
        shard = _VocabShard(local_vocab, tp_group, vocab_size)
        grad_logits = torch.empty_like(logits)  # [s, b, v/tp]
        grad_logits[..., shard.valid:].zero_()  # padded rows get zero gradient
        for s0 in range(0, seq_len, step):
            s1 = min(s0 + step, seq_len)
            z = _scaled_fp32(logits[s0:s1, :, :shard.valid], temperature)  # [n, v_valid]
            index, in_shard = shard.local_targets(targets[s0:s1].reshape(-1, k))
            grad_z = _chunk_grad_logits(
                z, log_norm[s0:s1].reshape(-1),
                entropy[s0:s1].reshape(-1) if grad_entropy is not None else entropy,
                index, in_shard,
                None if grad_logp is None else grad_logp[s0:s1].reshape(-1, k).float(),
                None if grad_entropy is None else grad_entropy[s0:s1].reshape(-1).float())
            if temperature != 1.0:
                grad_z.div_(temperature)  # z = logits / T
            grad_logits[s0:s1, :, :shard.valid] = grad_z.view(s1 - s0, batch, shard.valid)
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
    _check_temperature(temperature)
    if logits.dim() != 3:
        raise ValueError(f"logits must be [s, b, V/tp], got {tuple(logits.shape)}")
    targets_3d, has_k = _targets_3d(targets, logits.shape[0], logits.shape[1])
    logp, entropy = _LogprobsFromLogits.apply(
        logits, targets_3d, tp_group, float(temperature), vocab_size, chunk_size, with_entropy)
    logp = logp if has_k else logp.squeeze(-1)
    return (logp, entropy) if with_entropy else logp


# ----------------------------------------------------------------------------------------------
# Hidden-state path


class _LogprobsFromHidden(torch.autograd.Function):
    """Chunked, TP-exact log-probs and entropy from hidden states and a vocab-parallel head."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                tp_group: ProcessGroup, temperature: float, vocab_size: Optional[int],
                chunk_size: Optional[int], with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        seq_len, batch, hidden_size = hidden.shape  # [s, b, h]
        local_vocab = weight.shape[0]  # weight: [v/tp, h]
        k = targets.shape[2]
        shard = _VocabShard(local_vocab, tp_group, vocab_size)
        step = _chunk_positions(seq_len, batch, local_vocab, chunk_size)
        # fp32 copy of the real rows of the head (a view when the weight is already fp32):
        # weight-sized, independent of the sequence length. Released after forward; backward
        # makes it again rather than keep it alive in between.
        weight_fp32 = weight[:shard.valid].float()  # [v_valid, h]
        logp = hidden.new_empty((seq_len, batch, k), dtype=torch.float32)
        log_norm = hidden.new_empty((seq_len, batch), dtype=torch.float32)
        entropy = hidden.new_empty((seq_len, batch) if with_entropy else (0,), dtype=torch.float32)
        for s0 in range(0, seq_len, step):
            s1 = min(s0 + step, seq_len)
            hidden_fp32 = hidden[s0:s1].reshape(-1, hidden_size).float()  # [n, h]
            z = _chunk_logits(hidden_fp32, weight_fp32, temperature)  # [n, v_valid]
            index, in_shard = shard.local_targets(targets[s0:s1].reshape(-1, k))
            chunk_logp, chunk_norm, chunk_entropy = _chunk_forward(
                z, index, in_shard, tp_group, with_entropy)
            del z
            logp[s0:s1] = chunk_logp.view(s1 - s0, batch, k)
            log_norm[s0:s1] = chunk_norm.view(s1 - s0, batch)
            if with_entropy:
                entropy[s0:s1] = chunk_entropy.view(s1 - s0, batch)
        ctx.save_for_backward(hidden, weight, targets, log_norm, entropy)
        ctx.config = (tp_group, temperature, vocab_size, step, with_entropy)
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor]):
        hidden, weight, targets, log_norm, entropy = ctx.saved_tensors
        tp_group, temperature, vocab_size, step, with_entropy = ctx.config
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not with_entropy:
            grad_entropy = None
        if (grad_logp is None and grad_entropy is None) or not (need_hidden or need_weight):
            return (None,) * 8
        seq_len, batch, hidden_size = hidden.shape
        k = targets.shape[2]
        shard = _VocabShard(weight.shape[0], tp_group, vocab_size)
        weight_fp32 = weight[:shard.valid].float()  # [v_valid, h]
        # fp32 accumulators: [s, b, h] for the hidden states, [v/tp, h] for this shard's head rows.
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) \
            if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if need_weight else None
        for s0 in range(0, seq_len, step):
            s1 = min(s0 + step, seq_len)
            hidden_fp32 = hidden[s0:s1].reshape(-1, hidden_size).float()  # [n, h]
            z = _chunk_logits(hidden_fp32, weight_fp32, temperature)  # [n, v_valid]
            index, in_shard = shard.local_targets(targets[s0:s1].reshape(-1, k))
            grad_z = _chunk_grad_logits(
                z, log_norm[s0:s1].reshape(-1),
                entropy[s0:s1].reshape(-1) if grad_entropy is not None else entropy,
                index, in_shard,
                None if grad_logp is None else grad_logp[s0:s1].reshape(-1, k).float(),
                None if grad_entropy is None else grad_entropy[s0:s1].reshape(-1).float())
            if temperature != 1.0:
                grad_z.div_(temperature)  # z = hidden @ W^T / T
            if grad_hidden is not None:
                # [n, v_valid] @ [v_valid, h]: this shard's part of d/dhidden.
                torch.mm(grad_z, weight_fp32, out=grad_hidden[s0:s1].view(-1, hidden_size))
            if grad_weight is not None and shard.valid > 0:
                grad_weight[:shard.valid].addmm_(grad_z.t(), hidden_fp32)  # [v_valid, h]
            del z, grad_z
        if grad_hidden is not None:
            # Every rank saw only its vocabulary shard: the full gradient is the sum over TP.
            _all_reduce(grad_hidden, dist.ReduceOp.SUM, tp_group)
            grad_hidden = grad_hidden.to(hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def _chunk_logits(hidden_fp32: torch.Tensor, weight_fp32: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """fp32 logits [n, v_valid] = hidden_fp32 [n, h] @ weight_fp32^T / T, a fresh tensor."""
    z = hidden_fp32 @ weight_fp32.t()
    if temperature != 1.0:
        z.div_(temperature)
    return z


def token_logprobs_from_hidden(
    hidden: torch.Tensor,
    output_weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    tp_group: ProcessGroup = None,
    temperature: float = 1.0,
    vocab_size: Optional[int] = None,
    chunk_size: Optional[int] = None,
    with_entropy: bool = False,
) -> LogprobsOut:
    """Log-probs of `targets` (and entropy) from final hidden states and the vocab-parallel LM head.

    Equivalent to ``token_logprobs_from_logits(hidden @ output_weight.T, ...)`` but the logits only
    exist one fp32 chunk at a time, in forward and again (recomputed) in backward.

    Args:
        hidden: ``[s, b, h]`` the final (post-norm) hidden states, complete and identical on every
            TP rank. With sequence parallelism, gather them first with a gather whose backward
            *splits* the gradient (Megatron: ``gather_from_sequence_parallel_region(x,
            tensor_parallel_output_grad=False)``): this function already all-reduces the
            hidden-state gradient over ``tp_group``; a reduce-scatter would count it twice.
        output_weight: ``[V/tp, h]`` this rank's shard of the output layer weight
            (``model.shared_embedding_or_output_weight()`` when tied, else
            ``model.output_layer.weight``). Cast to fp32 per call (a weight-sized copy if bf16).
        targets: ``[s, b]`` (or ``[s, b, k]``) global token ids, same on every TP rank.
        tp_group, temperature, vocab_size, chunk_size, with_entropy: as in
            `token_logprobs_from_logits`.

    Returns:
        fp32 log-probs ``[s, b]`` (``[s, b, k]``), and entropy ``[s, b]`` with ``with_entropy``.
        Backward gives ``hidden`` the gradient summed over TP ranks (one all-reduce per call) and
        ``output_weight`` this shard's gradient (zero on padded rows), both in the input dtypes.
    """
    _check_temperature(temperature)
    if hidden.dim() != 3 or output_weight.dim() != 2 or hidden.shape[2] != output_weight.shape[1]:
        raise ValueError(f"expected hidden [s, b, h] and output_weight [V/tp, h]; got "
                         f"{tuple(hidden.shape)} and {tuple(output_weight.shape)}")
    targets_3d, has_k = _targets_3d(targets, hidden.shape[0], hidden.shape[1])
    logp, entropy = _LogprobsFromHidden.apply(
        hidden, output_weight, targets_3d, tp_group, float(temperature), vocab_size, chunk_size,
        with_entropy)
    logp = logp if has_k else logp.squeeze(-1)
    return (logp, entropy) if with_entropy else logp


# ----------------------------------------------------------------------------------------------
# Top-k of the distribution (a teacher's most likely tokens)


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
    _check_temperature(temperature)
    if logits.dim() != 3:
        raise ValueError(f"logits must be [s, b, V/tp], got {tuple(logits.shape)}")
    seq_len, batch, local_vocab = logits.shape
    shard = _VocabShard(local_vocab, tp_group, vocab_size)
    _, tp_size = _tp_rank_and_size(tp_group)
    total_vocab = vocab_size if vocab_size is not None else local_vocab * tp_size
    if not 1 <= k <= total_vocab:
        raise ValueError(f"k must be in [1, {total_vocab}] (the vocabulary), got {k}")
    local_k = min(k, shard.valid)
    step = _chunk_positions(seq_len, batch, local_vocab, chunk_size)
    values = logits.new_empty((seq_len, batch, k), dtype=torch.float32)
    ids = torch.empty((seq_len, batch, k), dtype=torch.int64, device=logits.device)
    for s0 in range(0, seq_len, step):
        s1 = min(s0 + step, seq_len)
        z = _scaled_fp32(logits[s0:s1, :, :shard.valid], temperature)  # [n, v_valid]
        log_norm = _global_log_norm(z, tp_group)  # [n]
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


# ----------------------------------------------------------------------------------------------
# Full-vocabulary reverse KL to the G-OPD target


def _mixture_logits(teacher_chunk: torch.Tensor, ref_chunk: Optional[torch.Tensor], lam: float,
                    temperature: float) -> torch.Tensor:
    """Unnormalised log q = lam * z_teacher + (1 - lam) * z_ref: [cs, b, v] -> fresh fp32 [n, v].

    Per-token normalisers of log pi* and log pi_ref are constants over the vocabulary, so the
    log-softmax of this mixture of logits is exactly log q for q ∝ pi_ref^(1-lam) pi*^lam.
    """
    mixed = _scaled_fp32(teacher_chunk, temperature)  # [n, v]
    if ref_chunk is None:
        return mixed
    mixed.mul_(lam)
    return mixed.add_(_scaled_fp32(ref_chunk, temperature), alpha=1.0 - lam)


def _global_log_norm(z: torch.Tensor, tp_group: ProcessGroup) -> torch.Tensor:
    """[n] logsumexp over the whole (sharded) vocabulary; does not modify `z`."""
    row_max = _global_max(z, tp_group)
    sum_exp = torch.exp(z - row_max[:, None]).sum(dim=1)
    _all_reduce(sum_exp, dist.ReduceOp.SUM, tp_group)
    return row_max + torch.log(sum_exp)


class _ReverseKLFromLogits(torch.autograd.Function):
    """Chunked, TP-exact KL(pi_student || q) per token; gradient w.r.t. the student logits only."""

    @staticmethod
    def forward(ctx, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                ref_logits: Optional[torch.Tensor], lam: float, tp_group: ProcessGroup,
                temperature: float, vocab_size: Optional[int],
                chunk_size: Optional[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        seq_len, batch, local_vocab = student_logits.shape  # [s, b, v/tp]
        shard = _VocabShard(local_vocab, tp_group, vocab_size)
        step = _chunk_positions(seq_len, batch, local_vocab, chunk_size)
        valid = shard.valid
        kl = student_logits.new_empty((seq_len, batch), dtype=torch.float32)  # [s, b]
        student_norm = torch.empty_like(kl)
        target_norm = torch.empty_like(kl)
        for s0 in range(0, seq_len, step):
            s1 = min(s0 + step, seq_len)
            rows = slice(s0, s1)
            log_p = _scaled_fp32(student_logits[rows, :, :valid], temperature)  # [n, v_valid]
            log_q = _mixture_logits(teacher_logits[rows, :, :valid],
                                    None if ref_logits is None else ref_logits[rows, :, :valid],
                                    lam, temperature)  # [n, v_valid]
            chunk_student_norm = _global_log_norm(log_p, tp_group)  # [n]
            chunk_target_norm = _global_log_norm(log_q, tp_group)  # [n]
            log_p.sub_(chunk_student_norm[:, None])  # [n, v] log pi_student
            log_q.sub_(chunk_target_norm[:, None])  # [n, v] log q
            # KL = sum_j p_j (log p_j - log q_j); this shard's rows, then summed over TP.
            chunk_kl = log_q.neg_().add_(log_p).mul_(torch.exp(log_p)).sum(dim=1)
            _all_reduce(chunk_kl, dist.ReduceOp.SUM, tp_group)
            kl[rows] = chunk_kl.view(s1 - s0, batch)
            student_norm[rows] = chunk_student_norm.view(s1 - s0, batch)
            target_norm[rows] = chunk_target_norm.view(s1 - s0, batch)
        ctx.save_for_backward(student_logits, teacher_logits, ref_logits, kl, student_norm,
                              target_norm)
        ctx.config = (lam, tp_group, temperature, vocab_size, step)
        ctx.set_materialize_grads(False)
        return kl

    @staticmethod
    def backward(ctx, grad_kl: Optional[torch.Tensor]):
        if grad_kl is None or not ctx.needs_input_grad[0]:
            return (None,) * 8
        (student_logits, teacher_logits, ref_logits, kl, student_norm,
         target_norm) = ctx.saved_tensors
        lam, tp_group, temperature, vocab_size, step = ctx.config
        seq_len, batch, local_vocab = student_logits.shape
        valid = _VocabShard(local_vocab, tp_group, vocab_size).valid
        grad_student = torch.empty_like(student_logits)  # [s, b, v/tp]
        grad_student[..., valid:].zero_()  # padded rows get zero gradient
        for s0 in range(0, seq_len, step):
            s1 = min(s0 + step, seq_len)
            rows = slice(s0, s1)
            log_p = _scaled_fp32(student_logits[rows, :, :valid], temperature)  # [n, v_valid]
            log_q = _mixture_logits(teacher_logits[rows, :, :valid],
                                    None if ref_logits is None else ref_logits[rows, :, :valid],
                                    lam, temperature)  # [n, v_valid]
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
    _check_temperature(temperature)
    if ref_logits is None and lam != 1.0:
        raise ValueError(f"ref_logits may be None only when lam == 1 (got lam={lam})")
    for name, other in (("teacher_logits", teacher_logits), ("ref_logits", ref_logits)):
        if other is not None and other.shape != student_logits.shape:
            raise ValueError(f"{name} {tuple(other.shape)} must match student_logits "
                             f"{tuple(student_logits.shape)}")
    if student_logits.dim() != 3:
        raise ValueError(f"logits must be [s, b, V/tp], got {tuple(student_logits.shape)}")
    if lam == 1.0:
        ref_logits = None  # q = pi*: the reference drops out exactly
    return _ReverseKLFromLogits.apply(
        student_logits, teacher_logits.detach(),
        None if ref_logits is None else ref_logits.detach(), float(lam), tp_group,
        float(temperature), vocab_size, chunk_size)
