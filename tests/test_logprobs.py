"""Tests of megatron_gopd.logprobs: chunked vocab-parallel token log-probs, entropy, full-vocab KL.

References are the naive full-tensor computations (``log_softmax(logits.float())``); the TP=2 checks
run on two gloo ranks through tests/dist_harness.py, all in one launch.
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from megatron_gopd.logprobs import (
    full_vocab_reverse_kl,
    token_logprobs_from_hidden,
    token_logprobs_from_logits,
    topk_logprobs_from_logits,
)
from tests.dist_harness import run_distributed

# fp32 against a naive fp32 reference: differences come only from summation order.
ATOL = 2e-5
RTOL = 1e-5


def _naive(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, vocab_size: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs [s, b] (or [s, b, k]) and entropy [s, b] from full logits [s, b, V]."""
    real = logits[..., :vocab_size] if vocab_size is not None else logits
    log_probs = torch.log_softmax(real.float() / temperature, dim=-1)  # [s, b, V]
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    index = targets if targets.dim() == 3 else targets.unsqueeze(-1)
    logp = log_probs.gather(-1, index)
    return (logp if targets.dim() == 3 else logp.squeeze(-1)), entropy


def _inputs(
    seq: int = 7,
    batch: int = 3,
    vocab: int = 50,
    hidden: int = 16,
    seed: int = 0,
    real_vocab: Optional[int] = None,
    k: Optional[int] = None,
):
    gen = torch.Generator().manual_seed(seed)
    hidden_states = torch.randn(seq, batch, hidden, generator=gen)  # [s, b, h]
    weight = torch.randn(vocab, hidden, generator=gen) / hidden**0.5  # [V, h]
    high = real_vocab if real_vocab is not None else vocab
    shape = (seq, batch) if k is None else (seq, batch, k)
    targets = torch.randint(0, high, shape, generator=gen)
    upstream = (
        torch.randn(seq, batch, *(() if k is None else (k,)), generator=gen),
        torch.randn(seq, batch, generator=gen),
    )
    return hidden_states, weight, targets, upstream


def _grads(outputs: tuple[torch.Tensor, torch.Tensor], upstream, inputs: list[torch.Tensor]):
    logp, entropy = outputs
    objective = (logp * upstream[0]).sum() + (entropy * upstream[1]).sum()
    return torch.autograd.grad(objective, inputs)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("real_vocab", [None, 41])
def test_logits_and_hidden_paths_match_naive_log_softmax(temperature: float, real_vocab: Optional[int]) -> None:
    hidden, weight, targets, upstream = _inputs(real_vocab=real_vocab)
    hidden.requires_grad_()
    weight.requires_grad_()
    kwargs = dict(temperature=temperature, vocab_size=real_vocab, chunk_size=5, with_entropy=True)

    logits = (hidden @ weight.t()).detach().requires_grad_()  # [s, b, V]
    ref_out = _naive(logits, targets, temperature, real_vocab)
    (ref_grad_logits,) = _grads(ref_out, upstream, [logits])
    out_logits = token_logprobs_from_logits(logits, targets, **kwargs)
    (grad_logits,) = _grads(out_logits, upstream, [logits])
    for got, want in zip(out_logits + (grad_logits,), ref_out + (ref_grad_logits,)):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)

    ref_hidden_out = _naive(hidden @ weight.t(), targets, temperature, real_vocab)
    ref_grads = _grads(ref_hidden_out, upstream, [hidden, weight])
    out_hidden = token_logprobs_from_hidden(hidden, weight, targets, **kwargs)
    grads = _grads(out_hidden, upstream, [hidden, weight])
    for got, want in zip(out_hidden + grads, ref_hidden_out + ref_grads):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    # Both paths agree with each other as well, and return fp32 [s, b].
    for got, want in zip(out_hidden, out_logits):
        assert got.dtype == torch.float32 and got.shape == targets.shape
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


def test_padded_vocab_rows_are_masked_and_get_no_gradient() -> None:
    real_vocab = 41
    hidden, weight, targets, upstream = _inputs(real_vocab=real_vocab)
    weight = weight.clone()
    weight[real_vocab:] = 100.0  # padded rows that would dominate the softmax if not masked
    weight.requires_grad_()
    logits = (hidden @ weight.t()).detach().requires_grad_()
    out = token_logprobs_from_logits(logits, targets, vocab_size=real_vocab, with_entropy=True)
    want = _naive(logits.detach()[..., :real_vocab], targets)
    for got, ref in zip(out, want):
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)
    (grad_logits,) = _grads(out, upstream, [logits])
    assert torch.all(grad_logits[..., real_vocab:] == 0)
    assert grad_logits[..., :real_vocab].abs().sum() > 0

    out_hidden = token_logprobs_from_hidden(hidden, weight, targets, vocab_size=real_vocab, with_entropy=True)
    (grad_weight,) = _grads(out_hidden, upstream, [weight])
    assert torch.all(grad_weight[real_vocab:] == 0)
    torch.testing.assert_close(out_hidden[0], want[0], atol=ATOL, rtol=RTOL)


def test_temperature_divides_the_logits() -> None:
    hidden, weight, targets, _ = _inputs()
    logits = hidden @ weight.t()
    at_temperature = token_logprobs_from_logits(logits, targets, temperature=0.5)
    pre_scaled = token_logprobs_from_logits(logits / 0.5, targets)
    torch.testing.assert_close(at_temperature, pre_scaled, atol=ATOL, rtol=RTOL)
    # Lower temperature sharpens: the entropy drops.
    _, entropy_cold = token_logprobs_from_logits(logits, targets, temperature=0.5, with_entropy=True)
    _, entropy_warm = token_logprobs_from_logits(logits, targets, temperature=2.0, with_entropy=True)
    assert torch.all(entropy_cold < entropy_warm)


def test_chunked_equals_unchunked() -> None:
    hidden, weight, targets, upstream = _inputs(seq=13, batch=2, vocab=64)
    logits = (hidden @ weight.t()).detach().requires_grad_()
    results = []
    for chunk_size in (None, 1, 5, 10_000):
        out = token_logprobs_from_logits(logits, targets, chunk_size=chunk_size, with_entropy=True)
        results.append(out + _grads(out, upstream, [logits]))
    # Every token's softmax is computed whole inside one chunk: chunking changes nothing, bitwise.
    for result in results[1:]:
        for got, want in zip(result, results[0]):
            assert torch.equal(got, want)

    hidden.requires_grad_()
    weight.requires_grad_()
    results = []
    for chunk_size in (None, 1, 5, 10_000):
        out = token_logprobs_from_hidden(hidden, weight, targets, chunk_size=chunk_size, with_entropy=True)
        results.append(out + _grads(out, upstream, [hidden, weight]))
    # The weight gradient is summed over chunks (and BLAS blocking may depend on the chunk's row
    # count): equal up to fp32 summation order, not bitwise (shared/pitfalls.md).
    for result in results[1:]:
        for got, want in zip(result, results[0]):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


class _LargestTensors(TorchDispatchMode):
    """Records the largest number of elements of any tensor each op creates, per dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.largest: dict[torch.dtype, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self.largest[tensor.dtype] = max(self.largest.get(tensor.dtype, 0), tensor.numel())
        return out


def test_no_full_vocabulary_fp32_tensor_is_materialised() -> None:
    seq, batch, vocab, hidden_size, chunk = 32, 2, 50, 8, 4
    hidden, weight, targets, _ = _inputs(seq, batch, vocab, hidden_size)
    full_logits_numel = seq * batch * vocab
    logits = (hidden @ weight.t()).to(torch.bfloat16).requires_grad_()
    with _LargestTensors() as logits_path:
        logp, entropy = token_logprobs_from_logits(logits, targets, chunk_size=chunk, with_entropy=True)
        (logp.sum() + entropy.sum()).backward()
    # fp32 only one chunk at a time; the bf16 gradient of the logits is the one full-size tensor.
    assert logits_path.largest[torch.float32] <= chunk * vocab
    assert logits_path.largest[torch.bfloat16] == full_logits_numel

    hidden.requires_grad_()
    weight.requires_grad_()
    with _LargestTensors() as hidden_path:
        logp, entropy = token_logprobs_from_hidden(hidden, weight, targets, chunk_size=chunk, with_entropy=True)
        (logp.sum() + entropy.sum()).backward()
    # Nothing logits-sized at all: chunks, the [s, b, h] and [V, h] gradients only.
    assert hidden_path.largest[torch.float32] <= max(chunk * vocab, seq * batch * hidden_size, vocab * hidden_size)
    # The detector does see the naive path's full fp32 copy.
    with _LargestTensors() as naive:
        torch.log_softmax(logits.float(), dim=-1).sum().backward()
    assert naive.largest[torch.float32] == full_logits_numel


def test_topk_targets_give_logprobs_of_each_id_with_gradients() -> None:
    hidden, weight, targets, upstream = _inputs(k=4)
    logits = (hidden @ weight.t()).detach().requires_grad_()
    logp = token_logprobs_from_logits(logits, targets, chunk_size=4)
    assert logp.shape == targets.shape
    ref = _naive(logits, targets)[0]
    torch.testing.assert_close(logp, ref, atol=ATOL, rtol=RTOL)
    (got,) = torch.autograd.grad((logp * upstream[0]).sum(), logits)
    (want,) = torch.autograd.grad((ref * upstream[0]).sum(), logits)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


def test_bf16_inputs_give_fp32_outputs_and_input_dtype_grads() -> None:
    hidden, weight, targets, upstream = _inputs()
    logits = (hidden @ weight.t()).to(torch.bfloat16).requires_grad_()
    out = token_logprobs_from_logits(logits, targets, with_entropy=True)
    assert all(t.dtype == torch.float32 for t in out)
    want = _naive(logits.detach(), targets)  # the reference also upcasts the bf16 logits
    for got, ref in zip(out, want):
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)
    (grad,) = _grads(out, upstream, [logits])
    assert grad.dtype == torch.bfloat16

    hidden_bf16 = hidden.to(torch.bfloat16).requires_grad_()
    weight_bf16 = weight.to(torch.bfloat16).requires_grad_()
    out = token_logprobs_from_hidden(hidden_bf16, weight_bf16, targets, with_entropy=True)
    grads = _grads(out, upstream, [hidden_bf16, weight_bf16])
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.bfloat16]


def test_forward_only_scoring_under_no_grad() -> None:
    hidden, weight, targets, _ = _inputs()
    with torch.no_grad():
        logp = token_logprobs_from_hidden(hidden, weight, targets)
    assert not logp.requires_grad
    torch.testing.assert_close(logp, _naive(hidden @ weight.t(), targets)[0], atol=ATOL, rtol=RTOL)


def test_invalid_arguments_are_rejected() -> None:
    hidden, weight, targets, _ = _inputs()
    logits = hidden @ weight.t()
    with pytest.raises(ValueError, match="vocab_size"):
        token_logprobs_from_logits(logits, targets, vocab_size=weight.shape[0] + 1)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs_from_logits(logits, targets, temperature=0.0)
    with pytest.raises(ValueError, match="targets"):
        token_logprobs_from_logits(logits, targets[:-1])
    with pytest.raises(ValueError, match="output_weight"):
        token_logprobs_from_hidden(hidden, weight.t(), targets)


# ----------------------------------------------------------------------------------------------
# TP = 2 against TP = 1, on two gloo ranks (one launch for every check)


def _max_abs_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.float() - want.float()).abs().max().item()


def _max_scaled_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """|got - want| / max(1, |want|): absolute below 1, relative above (KL values reach several
    nats, where 1e-6 absolute is a few fp32 ulps)."""
    return ((got - want).abs() / want.abs().clamp(min=1.0)).max().item()


def _tp_body(rank: int, world_size: int, real_vocab: int, temperature: float) -> dict[str, float]:
    """Every TP check on one rank; returns {check name: max |TP=2 - TP=1|}."""
    group = dist.new_group(list(range(world_size)))
    # The same inputs on every rank; each rank keeps its contiguous vocabulary shard.
    hidden, weight, targets, upstream = _inputs(seq=9, batch=2, vocab=64, hidden=16, seed=1, real_vocab=real_vocab)
    shard = slice(rank * 64 // world_size, (rank + 1) * 64 // world_size)
    kwargs = dict(temperature=temperature, vocab_size=real_vocab, chunk_size=4, with_entropy=True)
    diffs: dict[str, float] = {}

    # Logits path: values, entropy and the gradient of this rank's shard.
    full_logits = (hidden @ weight.t()).requires_grad_()  # [s, b, V]
    shard_logits = full_logits.detach()[..., shard].clone().requires_grad_()  # [s, b, V/tp]
    want = token_logprobs_from_logits(full_logits, targets, **kwargs)
    got = token_logprobs_from_logits(shard_logits, targets, tp_group=group, **kwargs)
    (want_grad,) = _grads(want, upstream, [full_logits])
    (got_grad,) = _grads(got, upstream, [shard_logits])
    diffs["logits/logp"] = _max_abs_diff(got[0], want[0])
    diffs["logits/entropy"] = _max_abs_diff(got[1], want[1])
    diffs["logits/grad"] = _max_abs_diff(got_grad, want_grad[..., shard])

    # Hidden path: the hidden gradient is all-reduced, the weight gradient stays sharded.
    full_hidden = hidden.clone().requires_grad_()
    full_weight = weight.clone().requires_grad_()
    tp_hidden = hidden.clone().requires_grad_()
    tp_weight = weight[shard].clone().requires_grad_()
    want = token_logprobs_from_hidden(full_hidden, full_weight, targets, **kwargs)
    got = token_logprobs_from_hidden(tp_hidden, tp_weight, targets, tp_group=group, **kwargs)
    want_grads = _grads(want, upstream, [full_hidden, full_weight])
    got_grads = _grads(got, upstream, [tp_hidden, tp_weight])
    diffs["hidden/logp"] = _max_abs_diff(got[0], want[0])
    diffs["hidden/entropy"] = _max_abs_diff(got[1], want[1])
    diffs["hidden/grad_hidden"] = _max_abs_diff(got_grads[0], want_grads[0])
    diffs["hidden/grad_weight"] = _max_abs_diff(got_grads[1], want_grads[1][shard])

    # A real vocabulary ending inside rank 0's shard: rank 1 holds only padding.
    small_vocab = 64 // world_size - 5
    small_targets = targets % small_vocab
    want = token_logprobs_from_logits(full_logits, small_targets, vocab_size=small_vocab, with_entropy=True)
    got = token_logprobs_from_logits(
        shard_logits, small_targets, vocab_size=small_vocab, tp_group=group, with_entropy=True
    )
    (want_grad,) = _grads(want, upstream, [full_logits])
    (got_grad,) = _grads(got, upstream, [shard_logits])
    diffs["padding_shard/logp"] = max(_max_abs_diff(got[0], want[0]), _max_abs_diff(got[1], want[1]))
    diffs["padding_shard/grad"] = _max_abs_diff(got_grad, want_grad[..., shard])

    # Top-k targets (3-d) through the hidden path.
    topk_ids = torch.topk(full_logits.detach()[..., :real_vocab], k=3, dim=-1).indices
    want = token_logprobs_from_hidden(hidden, weight, topk_ids, vocab_size=real_vocab)
    got = token_logprobs_from_hidden(hidden, weight[shard], topk_ids, vocab_size=real_vocab, tp_group=group)
    diffs["hidden/topk_logp"] = _max_abs_diff(got, want)

    # Full-vocabulary reverse KL to q ∝ ref^(1-lam) teacher^lam, and its student gradient.
    gen = torch.Generator().manual_seed(2)
    teacher_logits = torch.randn(full_logits.shape, generator=gen)
    ref_logits = torch.randn(full_logits.shape, generator=gen)
    student = full_logits.detach().clone().requires_grad_()
    student_shard = full_logits.detach()[..., shard].clone().requires_grad_()
    want_kl = full_vocab_reverse_kl(
        student, teacher_logits, ref_logits, 1.5, temperature=temperature, vocab_size=real_vocab, chunk_size=4
    )
    got_kl = full_vocab_reverse_kl(
        student_shard,
        teacher_logits[..., shard],
        ref_logits[..., shard],
        1.5,
        tp_group=group,
        temperature=temperature,
        vocab_size=real_vocab,
        chunk_size=4,
    )
    (want_grad,) = torch.autograd.grad((want_kl * upstream[1]).sum(), student)
    (got_grad,) = torch.autograd.grad((got_kl * upstream[1]).sum(), student_shard)
    diffs["kl/value"] = _max_scaled_diff(got_kl, want_kl)
    diffs["kl/grad"] = _max_abs_diff(got_grad, want_grad[..., shard])

    # A teacher's top-k: 8 of 57 tokens, found shard by shard and merged.
    want_values, want_ids = topk_logprobs_from_logits(
        teacher_logits, 8, temperature=temperature, vocab_size=real_vocab, chunk_size=4
    )
    got_values, got_ids = topk_logprobs_from_logits(
        teacher_logits[..., shard], 8, tp_group=group, temperature=temperature, vocab_size=real_vocab, chunk_size=4
    )
    diffs["topk/values"] = _max_abs_diff(got_values, want_values)
    diffs["topk/ids"] = float((got_ids != want_ids).sum())
    return diffs


@pytest.mark.slow
def test_tp2_matches_tp1() -> None:
    # 64 rows over 2 ranks; real vocabulary 57, so rank 1's shard ends in 7 padded rows.
    results = run_distributed(_tp_body, world_size=2, real_vocab=57, temperature=0.8)
    for rank, diffs in enumerate(results):
        assert len(diffs) == 14
        bad = {name: diff for name, diff in diffs.items() if not diff <= 1e-6}
        assert not bad, f"rank {rank}: TP=2 differs from TP=1 by more than 1e-6: {bad}"


def test_topk_logprobs_are_the_largest_log_softmax_values_and_skip_padding() -> None:
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 3, 40, generator=gen)
    logits[..., 37:] = 50.0  # padded rows beyond the real vocabulary must never be picked
    values, ids = topk_logprobs_from_logits(logits, 5, temperature=0.7, vocab_size=37, chunk_size=4)
    reference = torch.log_softmax(logits[..., :37] / 0.7, dim=-1)
    want = reference.topk(5, dim=-1)
    assert torch.equal(ids, want.indices)
    torch.testing.assert_close(values, want.values, rtol=0, atol=1e-6)
    full_values, full_ids = topk_logprobs_from_logits(logits, 37, vocab_size=37)
    assert torch.allclose(full_values.exp().sum(-1), torch.ones(6, 3), atol=1e-5)
    assert int(full_ids.max()) < 37
    with pytest.raises(ValueError, match="k must be in"):
        topk_logprobs_from_logits(logits, 38, vocab_size=37)
