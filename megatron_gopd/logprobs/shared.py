"""What every log-prob path shares: the vocabulary shard of a TP rank, the per-chunk softmax math
(forward statistics and the gradient w.r.t. a chunk's logits), chunk sizing and argument checks.

The chunk functions take `z`, a fresh fp32 scratch tensor of temperature-scaled logits [n, v_valid]
for the real (unpadded) rows of this rank's shard, and may overwrite it.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.distributed as dist

ProcessGroup = Optional[dist.ProcessGroup]
LogprobsOut = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]

# fp32 logits per chunk when chunk_size is None: 2**26 floats = 256 MiB per chunk-sized temporary
# (~440 tokens at V = 151,936 and TP = 1). Far smaller chunks cost time on CPU, where every chunk's
# matmul re-reads (and BLAS re-packs) the whole [V/tp, h] weight.
DEFAULT_CHUNK_ELEMENTS = 2**26


def tp_rank_and_size(tp_group: ProcessGroup) -> tuple[int, int]:
    """This rank's index in the tensor-parallel group and the group's size; (0, 1) without TP."""
    if tp_group is None:
        return 0, 1
    return dist.get_rank(group=tp_group), dist.get_world_size(group=tp_group)


def tp_all_reduce(tensor: torch.Tensor, op: dist.ReduceOp, tp_group: ProcessGroup) -> None:
    """In-place all-reduce over the TP group; a no-op without TP (or with a group of one)."""
    if tp_group is not None and dist.get_world_size(group=tp_group) > 1:
        dist.all_reduce(tensor, op=op, group=tp_group)


class VocabShard:
    """Where this rank's vocabulary shard sits, and which of its rows are real (not padding)."""

    def __init__(self, local_vocab: int, tp_group: ProcessGroup, vocab_size: Optional[int]) -> None:
        tp_rank, tp_size = tp_rank_and_size(tp_group)
        padded_vocab = local_vocab * tp_size
        if vocab_size is None:
            vocab_size = padded_vocab
        if not 0 < vocab_size <= padded_vocab:
            raise ValueError(
                f"vocab_size={vocab_size} must be in (0, {padded_vocab}] (local vocab {local_vocab} x tp {tp_size})"
            )
        self.start = tp_rank * local_vocab
        # Rows [0, valid) of the local shard are real tokens; the rest is Megatron's padding.
        self.valid = max(0, min(local_vocab, vocab_size - self.start))

    def local_targets(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global target ids [n, k] -> (local column [n, k], clamped into range; in-shard mask)."""
        local = targets - self.start
        in_shard = (local >= 0) & (local < self.valid)
        return local.clamp(0, max(self.valid - 1, 0)), in_shard


def global_max(z: torch.Tensor, tp_group: ProcessGroup) -> torch.Tensor:
    """[n] max over the whole vocabulary: the common shift that keeps exp() finite on every shard."""
    if z.shape[1] == 0:  # a shard made only of padding
        row_max = z.new_full((z.shape[0],), -math.inf)
    else:
        row_max = z.amax(dim=1)
    tp_all_reduce(row_max, dist.ReduceOp.MAX, tp_group)
    return row_max


def global_log_norm(z: torch.Tensor, tp_group: ProcessGroup) -> torch.Tensor:
    """[n] logsumexp over the whole (sharded) vocabulary; does not modify `z`."""
    row_max = global_max(z, tp_group)
    sum_exp = torch.exp(z - row_max[:, None]).sum(dim=1)
    tp_all_reduce(sum_exp, dist.ReduceOp.SUM, tp_group)
    return row_max + torch.log(sum_exp)


def gather_targets(z: torch.Tensor, index: torch.Tensor, in_shard: torch.Tensor) -> torch.Tensor:
    """[n, k] target logits held by this shard, 0 where another shard holds the target."""
    if z.shape[1] == 0:
        return z.new_zeros(index.shape)
    return torch.where(in_shard, z.gather(1, index), 0.0)


def chunk_forward(
    z: torch.Tensor,
    index: torch.Tensor,
    in_shard: torch.Tensor,
    tp_group: ProcessGroup,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probs of the targets [n, k], log-normaliser [n] and entropy [n] (empty if not asked)."""
    target_logits = gather_targets(z, index, in_shard)  # [n, k]
    row_max = global_max(z, tp_group)  # [n]
    shifted = z.sub_(row_max[:, None])  # [n, v] z - max, in place: z is scratch
    exp_shifted = torch.exp(shifted)  # [n, v]
    # One SUM all-reduce carries sum(exp), the target logits and (if asked) sum(exp * shifted).
    # Target logits are summed raw: the shard holding a target contributes it, the others 0.
    columns = [exp_shifted.sum(dim=1, keepdim=True), target_logits]
    if with_entropy:
        columns.append(exp_shifted.mul_(shifted).sum(dim=1, keepdim=True))
    stats = torch.cat(columns, dim=1)  # [n, 1 + k (+ 1)]
    tp_all_reduce(stats, dist.ReduceOp.SUM, tp_group)
    k = index.shape[1]
    log_sum_exp = torch.log(stats[:, 0])  # [n] log sum exp(z - max)
    log_norm = row_max + log_sum_exp  # [n] logsumexp(z)
    logp = stats[:, 1 : 1 + k] - log_norm[:, None]  # [n, k]
    if with_entropy:
        # H = logsumexp(z) - E_p[z] = log_sum_exp - E_p[z - max]
        entropy = log_sum_exp - stats[:, 1 + k] / stats[:, 0]
    else:
        entropy = z.new_empty(0)
    return logp, log_norm, entropy


def chunk_grad_logits(
    z: torch.Tensor,
    log_norm: torch.Tensor,
    entropy: torch.Tensor,
    index: torch.Tensor,
    in_shard: torch.Tensor,
    grad_logp: Optional[torch.Tensor],
    grad_entropy: Optional[torch.Tensor],
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


def chunk_positions(seq_len: int, batch: int, local_vocab: int, chunk_size: Optional[int]) -> int:
    """Sequence positions per chunk: about `chunk_size` tokens (s * b), at least one position."""
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_ELEMENTS // max(local_vocab, 1))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return max(1, min(seq_len, chunk_size // max(batch, 1)))


def scaled_fp32(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits chunk [cs, b, v] (any dtype, any strides) -> a fresh fp32 [cs * b, v] of x / T.

    One copy that converts and compacts at once; never a view of `x`, since callers overwrite it.
    """
    z = torch.empty(x.shape, dtype=torch.float32, device=x.device)  # contiguous [cs, b, v]
    z.copy_(x)
    if temperature != 1.0:
        z.div_(temperature)
    return z.view(x.shape[0] * x.shape[1], x.shape[2])  # not -1: a padding-only shard has v = 0


def check_temperature(temperature: float) -> None:
    """Refuse a temperature that is not > 0 (the logits are divided by it)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def as_targets_3d(targets: torch.Tensor, seq_len: int, batch: int) -> tuple[torch.Tensor, bool]:
    """Targets [s, b] or [s, b, k] -> ([s, b, k] int64, whether there was a k dimension)."""
    if targets.shape[:2] != (seq_len, batch) or targets.dim() not in (2, 3):
        raise ValueError(
            f"targets must be [s, b] or [s, b, k] with s, b = {seq_len}, {batch}; got {tuple(targets.shape)}"
        )
    has_k = targets.dim() == 3
    return (targets if has_k else targets.unsqueeze(-1)).long(), has_k
