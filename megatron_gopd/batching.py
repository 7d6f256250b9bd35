"""Packing sequences into micro-batches by token count, and the training micro-batch.

One packer serves every forward pass of the job: `pack_by_tokens` groups sequences (by length)
into micro-batches of at most a token budget, longest first so that the groups come out even.
A micro-batch runs either right-padded (the budget counts rows x padded length; `pad_token_rows`
lays a group out as ``[b, s]`` tokens, next-token targets and positions) or packed (the budget
counts the summed lengths; `megatron_gopd.packing.pack_sequences` lays the group end to end in one
``[1, t]`` row that the attention reads sequence by sequence, so no token is padding).
`balance_by_tokens` spreads sequences over data-parallel replicas by token count. The teacher /
reference pool (`megatron_gopd.scoring`) builds its forward micro-batches with them; the trainer
uses `pack_micro_batches` and `collate` below.

A `TrainSample` is one student rollout with everything the loss needs, aligned to its response
tokens; `collate` builds the `MicroBatch` of a group of them. Data-parallel ranks must run the
same number of micro-batches (expert-parallel all-to-alls pair them up), so the count is agreed
with `collectives.agree_on_micro_batch_count` and short ranks get empty micro-batches that
contribute nothing.

Imports only torch and `megatron_gopd.packing` (which imports megatron-core when it packs).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Union

import torch

from megatron_gopd.packing import PackedBatch, pack_sequences

__all__ = [
    "MicroBatch",
    "TrainSample",
    "balance_by_tokens",
    "collate",
    "pack_by_tokens",
    "pack_micro_batches",
    "pad_token_rows",
    "round_up",
]

TokenValues = Union[Sequence[float], torch.Tensor]
"""One value per response token: a list, or a ``[response_len]`` tensor on any device."""


# ----------------------------------------------------------------------------------------------
# Packing by token count


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= `value`."""
    return -(-value // multiple) * multiple


def pack_by_tokens(lengths: Sequence[int], budget: int, multiple: int = 1, packed: bool = False) -> list[list[int]]:
    """Group sequence indices into micro-batches of at most `budget` tokens.

    Right-padded (`packed` False): a micro-batch costs rows x its first (longest) sequence's length
    rounded up to `multiple` (sequence parallelism splits the sequence over TP); sequences go
    longest first (ties in index order) into the last micro-batch while it stays in budget.
    Packed: a micro-batch costs its summed length rounded up to `multiple`; longest first, each
    sequence goes to the first micro-batch it fits in (first-fit decreasing). Either way a sequence
    longer than the budget gets a micro-batch of its own (never dropped).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    if packed:
        loads: list[int] = []
        for index in order:
            fits = (b for b, load in enumerate(loads) if round_up(load + lengths[index], multiple) <= budget)
            target = next(fits, None)
            if target is None:
                batches.append([index])
                loads.append(lengths[index])
            else:
                batches[target].append(index)
                loads[target] += lengths[index]
        return batches
    padded_len = 0
    for index in order:
        if batches and (len(batches[-1]) + 1) * padded_len <= budget:
            batches[-1].append(index)
        else:
            batches.append([index])
            padded_len = round_up(lengths[index], multiple)
    return batches


def balance_by_tokens(lengths: Sequence[int], num_replicas: int) -> list[list[int]]:
    """Assign sequences to replicas: longest first, each to the replica with the fewest tokens.

    Deterministic (ties go to the lower index), so every rank computes the same assignment.
    """
    load = [0] * num_replicas
    assignment: list[list[int]] = [[] for _ in range(num_replicas)]
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        replica = min(range(num_replicas), key=lambda r: (load[r], r))
        assignment[replica].append(index)
        load[replica] += lengths[index]
    return assignment


def pad_token_rows(
    rows: Sequence[Sequence[int]], pad_id: int = 0, multiple: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`rows` right-padded to one batch, with their next-token targets and positions (on CPU).

    Right padding: under the causal mask no real position attends to a padded one, so padding
    changes nothing a real position's output depends on.

    Returns:
        tokens ``[b, s]`` int64 (``s``: the longest row rounded up to `multiple`), targets
        ``[b, s]`` int64 (the token each position predicts: the next one, `pad_id` past the end)
        and positions ``[b, s]`` int64.
    """
    length = round_up(max(len(r) for r in rows), multiple)
    tokens = torch.full((len(rows), length), pad_id, dtype=torch.int64)
    for index, row in enumerate(rows):
        tokens[index, : len(row)] = torch.tensor(list(row), dtype=torch.int64)
    targets = torch.full_like(tokens, pad_id)
    targets[:, :-1] = tokens[:, 1:]
    positions = torch.arange(length, dtype=torch.int64).unsqueeze(0).expand(len(rows), -1).contiguous()
    return tokens, targets, positions


# ----------------------------------------------------------------------------------------------
# Training micro-batches


@dataclasses.dataclass
class TrainSample:
    """One rollout, ready for the loss. Per-token values have one entry per response token: a list,
    or a ``[len(response_ids)]`` fp32 tensor as `megatron_gopd.scoring.SampleScores` holds them (on
    any device: `collate` builds the micro-batch there, with no round trip through the host)."""

    prompt_ids: list[int]
    response_ids: list[int]
    sampler_logprobs: TokenValues
    """The rollout engine's log-prob of each sampled token (for truncated importance sampling)."""
    teacher_logprobs: TokenValues
    """The routed teacher's log-prob of each response token."""
    ref_logprobs: Optional[TokenValues]
    """The teacher's reference's log-probs; None when the teacher has no reference (lam == 1)."""
    teacher: Optional[str]
    """Which teacher scored the sample (metrics are reported per teacher); None when no teacher
    did (a verifier-only or SFT sample: no dense reward)."""
    lam: float = 1.0
    """The teacher's G-OPD reward scale for this sample."""
    outcome_advantage: float = 0.0
    """Group-normalised verifier reward added to every token's advantage (0 when unused)."""
    teacher_topk_ids: Optional[torch.Tensor] = None
    """``[len(response_ids), k]`` the teacher's top-k token ids at each response position (top-k
    loss only; `megatron_gopd.scoring.SampleScores`)."""
    teacher_topk_logprobs: Optional[torch.Tensor] = None
    """``[len(response_ids), k]`` the teacher's log-probs of those ids."""
    ref_topk_logprobs: Optional[torch.Tensor] = None
    """``[len(response_ids), k]`` the reference's log-probs of those ids; None without a reference."""

    @property
    def num_tokens(self) -> int:
        """Prompt plus response tokens: the row length this sample needs in a micro-batch."""
        return len(self.prompt_ids) + len(self.response_ids)

    @property
    def response_span(self) -> tuple[int, int]:
        """[start, end) of the positions that predict the response tokens (position t predicts t + 1)."""
        start = len(self.prompt_ids) - 1
        return start, start + len(self.response_ids)


def pack_micro_batches(
    samples: Sequence[TrainSample], max_tokens: int, multiple: int = 1, packed: bool = False
) -> list[list[TrainSample]]:
    """Group samples into micro-batches of at most `max_tokens` tokens (padded rows, or packed
    summed lengths), longest first; `pack_by_tokens`.

    A sample longer than `max_tokens` gets a micro-batch of its own (never dropped).
    """
    lengths = [s.num_tokens for s in samples]
    return [[samples[i] for i in batch] for batch in pack_by_tokens(lengths, max_tokens, multiple, packed)]


@dataclasses.dataclass
class MicroBatch:
    """The tensors of one training micro-batch, batch-major. Position t of the ``*_logprobs``
    tensors and of `loss_mask` refers to the token at ``tokens[:, t + 1]`` (the target of position t)."""

    tokens: torch.Tensor  # [b, s] long, right-padded
    position_ids: torch.Tensor  # [b, s] long
    targets: torch.Tensor  # [b, s] long: tokens shifted left by one
    loss_mask: torch.Tensor  # [b, s] float: 1 on response targets
    sampler_logprobs: torch.Tensor  # [b, s] fp32
    teacher_logprobs: torch.Tensor  # [b, s] fp32
    ref_logprobs: torch.Tensor  # [b, s] fp32 (teacher's where a sample has no reference)
    outcome_advantage: torch.Tensor  # [b, 1] fp32
    teachers: list[Optional[str]]
    """Per row: the teacher that scored it, None for rows without a dense reward."""
    lams: list[float]
    """Per row: the teacher's lam."""
    has_reference: list[bool]
    """Per row: whether `ref_logprobs` holds a reference's log-probs (else the teacher's)."""
    # Top-k loss only (None otherwise), aligned like the log-probs above; padded positions hold
    # token 0 with a uniform distribution, finite but masked out.
    topk_ids: Optional[torch.Tensor] = None  # [b, s, k] long
    teacher_topk_logprobs: Optional[torch.Tensor] = None  # [b, s, k] fp32
    ref_topk_logprobs: Optional[torch.Tensor] = None  # [b, s, k] fp32 (teacher's where no reference)
    packed: Optional[PackedBatch] = None
    """The model's input when the micro-batch runs packed: the rows above end to end in one
    ``[1, t]`` row (`PackedBatch.gather_padded` / `scatter_padded` move per-token values between
    the two layouts); None when the model reads the right-padded ``tokens`` itself."""

    @property
    def num_response_tokens(self) -> int:
        """Tokens the loss is taken over."""
        return int(self.loss_mask.sum().item())


def collate(
    samples: Sequence[TrainSample],
    pad_id: int = 0,
    device: Optional[torch.device] = None,
    topk: int = 0,
    multiple: int = 1,
    packed: bool = False,
) -> MicroBatch:
    """Pad `samples` to one ``[b, s]`` micro-batch; an empty list gives a 2-token dummy (mask 0).

    The mask comes from each sample's response length, never from comparing with the pad id:
    Qwen3's pad id is also one of its EOS ids, and the real EOS must be trained on. With `topk` > 0
    the samples' top-k fields (all ``[len(response_ids), topk]``) become ``[b, s, topk]`` tensors.
    With `packed` the micro-batch also carries its packed model input (`MicroBatch.packed`). The
    model's sequence length, ``s`` or the packed row's ``t``, is rounded up to `multiple` (the TP
    size under sequence parallelism, which splits that dimension over the TP ranks).
    """
    rows = [s.prompt_ids + s.response_ids for s in samples] or [[pad_id, pad_id]]
    tokens, targets, positions = pad_token_rows(rows, pad_id=pad_id, multiple=1 if packed else multiple)
    batch, length = tokens.shape
    spans = [s.response_span for s in samples]
    mask = _response_values(spans, [[1.0] * len(s.response_ids) for s in samples], batch, length)
    sampler = _response_values(spans, [s.sampler_logprobs for s in samples], batch, length)
    teacher = _response_values(spans, [s.teacher_logprobs for s in samples], batch, length)
    ref = _response_values(
        spans, [s.teacher_logprobs if s.ref_logprobs is None else s.ref_logprobs for s in samples], batch, length
    )
    outcome = torch.tensor([[s.outcome_advantage] for s in samples]) if samples else torch.zeros((1, 1))
    out = MicroBatch(
        tokens,
        positions,
        targets,
        mask,
        sampler,
        teacher,
        ref,
        outcome,
        [s.teacher for s in samples],
        [s.lam for s in samples],
        [s.ref_logprobs is not None for s in samples],
    )
    if topk:
        ids, teacher_topk, ref_topk = _topk_padding(batch, length, topk)
        for row, s in enumerate(samples):
            if s.teacher_topk_ids is None or s.teacher_topk_ids.shape != (len(s.response_ids), topk):
                raise ValueError(
                    f"sample {row} has no [response_len, {topk}] teacher top-k (scored "
                    f"without ScoringPool.score(topk={topk})?)"
                )
            start, end = s.response_span
            ids[row, start:end] = s.teacher_topk_ids.to(torch.long).cpu()
            teacher_topk[row, start:end] = s.teacher_topk_logprobs.float().cpu()
            ref_source = s.ref_topk_logprobs if s.ref_topk_logprobs is not None else s.teacher_topk_logprobs
            ref_topk[row, start:end] = ref_source.float().cpu()
        out.topk_ids, out.teacher_topk_logprobs, out.ref_topk_logprobs = ids, teacher_topk, ref_topk
    out = out if device is None else _on(out, device)
    if packed:
        out.packed = pack_sequences(rows, pad_to_multiple_of=multiple, pad_id=pad_id, device=device)
    return out


def _response_values(
    spans: Sequence[tuple[int, int]], values: Sequence[TokenValues], batch: int, length: int
) -> torch.Tensor:
    """``[batch, length]`` fp32: row r holds ``values[r]`` on ``spans[r]``, 0 elsewhere.

    Built on the device of the first tensor among `values` (CPU when all are lists), so scores
    that already sit on the accelerator stay there.
    """
    device = next((v.device for v in values if torch.is_tensor(v)), torch.device("cpu"))
    out = torch.zeros((batch, length), device=device)
    for row, ((start, end), row_values) in enumerate(zip(spans, values)):
        out[row, start:end] = torch.as_tensor(row_values, dtype=torch.float32, device=device)
    return out


def _topk_padding(batch: int, length: int, topk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k tensors for positions without a response token: token 0, uniform log-probs."""
    uniform = torch.full((batch, length, topk), -math.log(topk + 1))
    return torch.zeros((batch, length, topk), dtype=torch.long), uniform, uniform.clone()


def _on(batch: MicroBatch, device: torch.device) -> MicroBatch:
    return MicroBatch(**{f.name: _to(getattr(batch, f.name), device) for f in dataclasses.fields(batch)})


def _to(value, device: torch.device):
    return value.to(device) if torch.is_tensor(value) else value
