"""The one packer (megatron_gopd.batching) and the two micro-batch builders on top of it."""

from __future__ import annotations

import torch

from megatron_gopd.batching import (
    TrainSample,
    balance_by_tokens,
    collate,
    pack_by_tokens,
    pack_micro_batches,
    pad_token_rows,
)


def test_micro_batches_respect_the_token_budget():
    lengths = [5, 17, 3, 9, 9, 30, 1]
    batches = pack_by_tokens(lengths, budget=20, multiple=2)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        padded = -(-max(lengths[i] for i in batch) // 2) * 2
        assert len(batch) == 1 or len(batch) * padded <= 20, batch
    assert [5] in batches  # longer than the budget: alone
    assignment = balance_by_tokens([10, 1, 7, 3, 3], 2)
    assert sorted(i for share in assignment for i in share) == list(range(5))
    # longest first, each to the lighter replica (ties to the lower index): 10+3 | 7+3+1
    assert assignment == [[0, 4], [2, 3, 1]]


def _sample(prompt_len: int, response_len: int, seed: int, as_tensors: bool = False) -> TrainSample:
    gen = torch.Generator().manual_seed(seed)
    values = [-torch.rand(response_len, generator=gen) for _ in range(3)]
    convert = (lambda t: t) if as_tensors else (lambda t: t.tolist())
    return TrainSample(
        prompt_ids=list(range(1, prompt_len + 1)),
        response_ids=list(range(50, 50 + response_len)),
        sampler_logprobs=convert(values[0]),
        teacher_logprobs=convert(values[1]),
        ref_logprobs=convert(values[2]) if seed % 2 else None,
        teacher=f"t{seed % 2}",
        outcome_advantage=0.5 * seed,
    )


def test_training_packer_is_the_shared_packer():
    samples = [_sample(p, r, i) for i, (p, r) in enumerate([(3, 4), (2, 9), (5, 1), (4, 4), (1, 12)])]
    groups = pack_micro_batches(samples, max_tokens=16)
    indices = pack_by_tokens([s.num_tokens for s in samples], 16)
    assert [[samples.index(s) for s in g] for g in groups] == indices
    assert [len(g) for g in groups] == [1, 1, 2, 1]  # 13 | 11 | 8 + 7 | 6 tokens


def test_collate_aligns_response_values_and_accepts_tensors():
    samples = [_sample(3, 4, 1), _sample(2, 6, 2)]
    mb = collate(samples, pad_id=7)
    assert mb.tokens.shape == (2, 8) and mb.tokens[0, 7].item() == 7  # right-padded with pad_id
    assert torch.equal(mb.targets[:, :-1], mb.tokens[:, 1:])
    assert torch.equal(mb.position_ids, torch.arange(8).expand(2, -1))
    # response token j of a sample is predicted at position len(prompt) - 1 + j
    assert mb.loss_mask[0].tolist() == [0, 0, 1, 1, 1, 1, 0, 0]
    assert mb.loss_mask[1].tolist() == [0, 1, 1, 1, 1, 1, 1, 0]
    assert torch.equal(mb.teacher_logprobs[0, 2:6], torch.tensor(samples[0].teacher_logprobs))
    assert torch.equal(mb.ref_logprobs[1, 1:7], torch.tensor(samples[1].teacher_logprobs))  # no reference
    assert mb.outcome_advantage.tolist() == [[0.5], [1.0]] and mb.teachers == ["t1", "t0"]
    # Scores straight from the pool (tensors) give the same micro-batch as lists.
    from_tensors = collate([_sample(3, 4, 1, as_tensors=True), _sample(2, 6, 2, as_tensors=True)], pad_id=7)
    for name in ("tokens", "targets", "loss_mask", "sampler_logprobs", "teacher_logprobs", "ref_logprobs"):
        assert torch.equal(getattr(from_tensors, name), getattr(mb, name)), name
        assert getattr(from_tensors, name).dtype == getattr(mb, name).dtype, name


def test_collate_of_nothing_is_a_masked_dummy():
    mb = collate([], pad_id=3, topk=2)
    assert mb.tokens.tolist() == [[3, 3]] and mb.num_response_tokens == 0 and mb.teachers == []
    assert mb.topk_ids.shape == (1, 2, 2) and torch.isfinite(mb.teacher_topk_logprobs).all()


def test_pad_token_rows_rounds_the_length_up():
    tokens, targets, positions = pad_token_rows([[1, 2, 3], [4]], multiple=4)
    assert tokens.tolist() == [[1, 2, 3, 0], [4, 0, 0, 0]]
    assert targets.tolist() == [[2, 3, 0, 0], [0, 0, 0, 0]]
    assert positions.tolist() == [[0, 1, 2, 3]] * 2


def test_scoring_forward_batch_carries_extra_targets():
    from megatron_gopd.scoring.forward import ScoredSequence, collate_forward, decode_sequences, encode_sequences

    sequences = [
        ScoredSequence([1, 2, 3, 4, 5], 2, torch.tensor([[7, 8], [9, 10], [11, 12]])),
        ScoredSequence([6, 7, 8], 1, torch.tensor([[1, 1], [2, 2]])),
    ]
    decoded = decode_sequences(encode_sequences(sequences, torch.device("cpu")))
    assert [(s.tokens, s.prompt_len, s.extra_targets.tolist()) for s in decoded] == [
        (s.tokens, s.prompt_len, s.extra_targets.tolist()) for s in sequences
    ]
    batch = collate_forward(sequences, [1, 0], multiple=2)
    assert batch.tokens.shape == (2, 6) and batch.indices == [1, 0]
    assert batch.targets.shape == (6, 2, 3)  # [s, b, 1 + k]
    assert batch.targets[:, 1, 0].tolist() == [2, 3, 4, 5, 0, 0]  # the next token
    assert batch.targets[1:4, 1, 1:].tolist() == [[7, 8], [9, 10], [11, 12]]  # at response positions
    assert batch.targets[:, 0, 1:].tolist() == [[1, 1], [2, 2], [0, 0], [0, 0], [0, 0], [0, 0]]


def test_packed_micro_batches_count_summed_lengths_first_fit():
    lengths = [5, 17, 3, 9, 9, 30, 1]
    batches = pack_by_tokens(lengths, budget=20, multiple=2, packed=True)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    # longest first, each into the first micro-batch with room (sums rounded up to 2):
    # 30 alone (over budget) | 17 + 3 | 9 + 9 + 1 (19 -> 20) | 5
    assert batches == [[5], [1, 2], [3, 4, 6], [0]]
    for batch in batches:
        assert len(batch) == 1 or -(-sum(lengths[i] for i in batch) // 2) * 2 <= 20, batch
    samples = [_sample(p, r, i) for i, (p, r) in enumerate([(3, 4), (2, 9), (5, 1), (4, 4), (1, 12)])]
    groups = pack_micro_batches(samples, max_tokens=16, packed=True)
    assert [[samples.index(s) for s in g] for g in groups] == pack_by_tokens(
        [s.num_tokens for s in samples], 16, packed=True
    )


def test_collate_rounds_the_padded_length_up_to_the_sequence_parallel_multiple():
    """Sequence parallelism splits s over the TP ranks: the padded rows' length is a multiple of it,
    and the extra columns are padding the loss never sees."""
    samples = [_sample(3, 4, 1), _sample(1, 1, 2)]  # 7 and 2 tokens
    plain, rounded = collate(samples, pad_id=7), collate(samples, pad_id=7, multiple=4)
    assert plain.tokens.shape == (2, 7) and rounded.tokens.shape == (2, 8)
    assert torch.equal(rounded.tokens[:, :7], plain.tokens) and rounded.tokens[:, 7].eq(7).all()
    assert torch.equal(rounded.loss_mask[:, :7], plain.loss_mask) and rounded.loss_mask[:, 7].eq(0).all()
    assert rounded.packed is None


def test_collate_packs_the_model_input_and_maps_values_between_layouts():
    samples = [_sample(3, 4, 1), _sample(2, 6, 2), _sample(1, 1, 3)]
    mb = collate(samples, pad_id=7, topk=0, multiple=4, packed=True)
    packed = mb.packed
    assert packed.lengths == [7, 8, 2] and packed.tokens.shape == (1, 20) and packed.num_padding == 3
    assert packed.offsets == [0, 7, 15]
    # the packed row is the padded rows' real tokens end to end, positions restarting per sequence
    assert torch.equal(packed.gather_padded(mb.tokens, fill=7), packed.tokens)
    assert torch.equal(packed.gather_padded(mb.position_ids)[:, :17], packed.position_ids[:, :17])
    # targets packed through the padded layout: the next token of the same sequence (pad at its end)
    targets = packed.gather_padded(mb.targets)[0]
    assert targets[6].item() == 7 and targets[5].item() == packed.tokens[0, 6].item()
    # scatter is gather's inverse on real positions, fill elsewhere, and carries gradients
    values = torch.randn(1, 20, requires_grad=True)
    rows = packed.scatter_padded(values, mb.tokens.shape[1], fill=-1.0)
    assert rows.shape == mb.tokens.shape and rows[2, 2:].eq(-1.0).all()
    assert torch.equal(packed.gather_padded(rows.detach())[0, :17], values.detach()[0, :17])
    (rows * mb.loss_mask).sum().backward()
    assert values.grad.sum().item() == mb.loss_mask.sum().item()
    assert collate([], pad_id=7, packed=True).packed.lengths == [2]  # the dummy packs too
