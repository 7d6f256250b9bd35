"""The hidden-state path: target log-probs and entropy from the final hidden states [s, b, h] and
the vocab-parallel output weight [V/tp, h], the logits existing one fp32 chunk at a time.

The LM head is where memory goes: at 16k tokens x 151,936 vocabulary a bf16 logits tensor is ~4.9 GB
per sequence, GPTModel makes a second transposed copy, and backward needs a gradient of the same
size. This path never builds the full logits: each chunk's are computed in fp32 (16-bit GEMM
inputs with fp32 accumulation on GPU, `head_gemm`), recomputed in backward, and the weight gradient
is accumulated chunk by chunk. It is the one the trainer uses.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_gopd.logprobs.head_gemm import fp32_addmm_, fp32_mm, head_gemm_dtype
from megatron_gopd.logprobs.shared import (
    LogprobsOut,
    ProcessGroup,
    VocabShard,
    as_targets_3d,
    check_temperature,
    chunk_forward,
    chunk_grad_logits,
    chunk_positions,
    tp_all_reduce,
)


class _LogprobsFromHidden(torch.autograd.Function):
    """Chunked, TP-exact log-probs and entropy from hidden states and a vocab-parallel head."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        tp_group: ProcessGroup,
        temperature: float,
        vocab_size: Optional[int],
        chunk_size: Optional[int],
        with_entropy: bool,
        gemm_dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        seq_len, batch, hidden_size = hidden.shape  # [s, b, h]
        local_vocab = weight.shape[0]  # weight: [v/tp, h]
        k = targets.shape[2]
        shard = VocabShard(local_vocab, tp_group, vocab_size)
        step = chunk_positions(seq_len, batch, local_vocab, chunk_size)
        # The real rows of the head in the GEMM's dtype (a view unless that differs from the
        # weight's): weight-sized, independent of the sequence length. Released after forward;
        # backward makes it again rather than keep it alive in between.
        head = weight[: shard.valid].to(gemm_dtype)  # [v_valid, h]
        logp = hidden.new_empty((seq_len, batch, k), dtype=torch.float32)
        log_norm = hidden.new_empty((seq_len, batch), dtype=torch.float32)
        entropy = hidden.new_empty((seq_len, batch) if with_entropy else (0,), dtype=torch.float32)
        for s0 in range(0, seq_len, step):
            s1 = min(s0 + step, seq_len)
            z = _chunk_logits(hidden[s0:s1].reshape(-1, hidden_size), head, temperature, gemm_dtype)  # [n, v_valid]
            index, in_shard = shard.local_targets(targets[s0:s1].reshape(-1, k))
            chunk_logp, chunk_norm, chunk_entropy = chunk_forward(z, index, in_shard, tp_group, with_entropy)
            del z
            logp[s0:s1] = chunk_logp.view(s1 - s0, batch, k)
            log_norm[s0:s1] = chunk_norm.view(s1 - s0, batch)
            if with_entropy:
                entropy[s0:s1] = chunk_entropy.view(s1 - s0, batch)
        ctx.save_for_backward(hidden, weight, targets, log_norm, entropy)
        ctx.config = (tp_group, temperature, vocab_size, step, with_entropy, gemm_dtype)
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor]):
        hidden, weight, targets, log_norm, entropy = ctx.saved_tensors
        tp_group, temperature, vocab_size, step, with_entropy, gemm_dtype = ctx.config
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not with_entropy:
            grad_entropy = None
        if (grad_logp is None and grad_entropy is None) or not (need_hidden or need_weight):
            return (None,) * 9
        seq_len, batch, hidden_size = hidden.shape
        k = targets.shape[2]
        shard = VocabShard(weight.shape[0], tp_group, vocab_size)
        head = weight[: shard.valid].to(gemm_dtype)  # [v_valid, h]
        # fp32 accumulators: [s, b, h] for the hidden states, [v/tp, h] for this shard's head rows.
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        for s0 in range(0, seq_len, step):
            s1 = min(s0 + step, seq_len)
            hidden_chunk = hidden[s0:s1].reshape(-1, hidden_size)  # [n, h]
            z = _chunk_logits(hidden_chunk, head, temperature, gemm_dtype)  # [n, v_valid]
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
                grad_z.div_(temperature)  # z = hidden @ W^T / T
            if grad_hidden is not None:
                # [n, v_valid] @ [v_valid, h]: this shard's part of d/dhidden.
                grad_hidden[s0:s1].view(-1, hidden_size).copy_(fp32_mm(grad_z, head, gemm_dtype))
            if grad_weight is not None and shard.valid > 0:
                fp32_addmm_(grad_weight[: shard.valid], grad_z.t(), hidden_chunk, gemm_dtype)  # [v_valid, h]
            del z, grad_z
        if grad_hidden is not None:
            # Every rank saw only its vocabulary shard: the full gradient is the sum over TP.
            tp_all_reduce(grad_hidden, dist.ReduceOp.SUM, tp_group)
            grad_hidden = grad_hidden.to(hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def _chunk_logits(
    hidden: torch.Tensor, head: torch.Tensor, temperature: float, gemm_dtype: torch.dtype
) -> torch.Tensor:
    """fp32 logits [n, v_valid] = hidden [n, h] @ head [v_valid, h]^T / T, a fresh tensor."""
    z = fp32_mm(hidden, head.t(), gemm_dtype)
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
    gemm_dtype: Optional[torch.dtype] = None,
) -> LogprobsOut:
    """Log-probs of `targets` (and entropy) from final hidden states and the vocab-parallel LM head.

    Equivalent to ``token_logprobs_from_logits(hidden @ output_weight.T, ...)`` with fp32 logits, but
    the logits only exist one chunk at a time, in forward and again (recomputed) in backward.

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
        gemm_dtype: the dtype of the head's GEMM inputs (accumulation and output are fp32 in every
            case); default: the weight's on CUDA (bf16 models run bf16 tensor-core GEMMs), fp32 on
            CPU (`megatron_gopd.logprobs.head_gemm`).

    Returns:
        fp32 log-probs ``[s, b]`` (``[s, b, k]``), and entropy ``[s, b]`` with ``with_entropy``.
        Backward gives ``hidden`` the gradient summed over TP ranks (one all-reduce per call) and
        ``output_weight`` this shard's gradient (zero on padded rows), both in the input dtypes.
    """
    check_temperature(temperature)
    if hidden.dim() != 3 or output_weight.dim() != 2 or hidden.shape[2] != output_weight.shape[1]:
        raise ValueError(
            f"expected hidden [s, b, h] and output_weight [V/tp, h]; got "
            f"{tuple(hidden.shape)} and {tuple(output_weight.shape)}"
        )
    targets_3d, has_k = as_targets_3d(targets, hidden.shape[0], hidden.shape[1])
    logp, entropy = _LogprobsFromHidden.apply(
        hidden,
        output_weight,
        targets_3d,
        tp_group,
        float(temperature),
        vocab_size,
        chunk_size,
        with_entropy,
        head_gemm_dtype(output_weight, gemm_dtype),
    )
    logp = logp if has_k else logp.squeeze(-1)
    return (logp, entropy) if with_entropy else logp
