"""Turn scored rollouts into training micro-batches, balanced by token count.

A `TrainSample` is one student rollout with everything the loss needs, aligned to its response
tokens. `pack_micro_batches` groups samples into micro-batches of at most ``max_tokens`` tokens
(prompt + response, padded to the longest in the group), longest first so that the groups come out
even; `collate` builds the ``[b, s]`` tensors of one micro-batch. Data-parallel ranks must run the
same number of micro-batches (expert-parallel all-to-alls pair them up), so the count is agreed
with an all-reduce and short ranks get empty micro-batches that contribute nothing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist


@dataclasses.dataclass
class TrainSample:
    """One rollout, ready for the loss. Per-token values (lists or 1-d tensors) have one entry per
    response token."""

    prompt_ids: list[int]
    response_ids: list[int]
    sampler_logprobs: Union[list[float], torch.Tensor]
    """The rollout engine's log-prob of each sampled token (for truncated importance sampling)."""
    teacher_logprobs: Union[list[float], torch.Tensor]
    """The routed teacher's log-prob of each response token."""
    ref_logprobs: Union[list[float], torch.Tensor, None]
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
        return len(self.prompt_ids) + len(self.response_ids)


def pack_micro_batches(samples: Sequence[TrainSample], max_tokens: int) -> list[list[TrainSample]]:
    """Group samples into micro-batches of at most `max_tokens` padded tokens, longest first.

    A sample longer than `max_tokens` gets a micro-batch of its own (never dropped).
    """
    order = sorted(range(len(samples)), key=lambda i: samples[i].num_tokens, reverse=True)
    batches: list[list[TrainSample]] = []
    current: list[TrainSample] = []
    longest = 0
    for i in order:
        sample = samples[i]
        padded = max(longest, sample.num_tokens) * (len(current) + 1)
        if current and padded > max_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(sample)
        longest = max(longest, sample.num_tokens)
    if current:
        batches.append(current)
    return batches


def agree_on_micro_batch_count(local_count: int, group: Optional[dist.ProcessGroup]) -> int:
    """The largest micro-batch count over the data-parallel group (every rank runs that many)."""
    count = torch.tensor([local_count], dtype=torch.long)
    if dist.is_initialized() and group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=group)
    return int(count.item())


@dataclasses.dataclass
class MicroBatch:
    """The tensors of one micro-batch, batch-major. Position t of the ``*_logprobs`` tensors and of
    `loss_mask` refers to the token at ``tokens[:, t + 1]`` (the target of position t)."""

    tokens: torch.Tensor            # [b, s] long, right-padded
    position_ids: torch.Tensor      # [b, s] long
    targets: torch.Tensor           # [b, s] long: tokens shifted left by one
    loss_mask: torch.Tensor         # [b, s] float: 1 on response targets
    sampler_logprobs: torch.Tensor  # [b, s] fp32
    teacher_logprobs: torch.Tensor  # [b, s] fp32
    ref_logprobs: torch.Tensor      # [b, s] fp32 (teacher's where a sample has no reference)
    outcome_advantage: torch.Tensor  # [b, 1] fp32
    teachers: list[Optional[str]]
    """Per row: the teacher that scored it, None for rows without a dense reward."""
    lams: list[float]
    """Per row: the teacher's lam."""
    has_reference: list[bool]
    """Per row: whether `ref_logprobs` holds a reference's log-probs (else the teacher's)."""
    # Top-k loss only (None otherwise), aligned like the log-probs above; padded positions hold
    # token 0 with a uniform distribution, finite but masked out.
    topk_ids: Optional[torch.Tensor] = None               # [b, s, k] long
    teacher_topk_logprobs: Optional[torch.Tensor] = None  # [b, s, k] fp32
    ref_topk_logprobs: Optional[torch.Tensor] = None      # [b, s, k] fp32 (teacher's where no reference)

    @property
    def num_response_tokens(self) -> int:
        return int(self.loss_mask.sum().item())


def collate(samples: Sequence[TrainSample], pad_id: int = 0, device: Optional[torch.device] = None,
            topk: int = 0) -> MicroBatch:
    """Pad `samples` to one ``[b, s]`` micro-batch; an empty list gives a 1-token dummy (mask 0).

    The mask comes from each sample's response length, never from comparing with the pad id:
    Qwen3's pad id is also one of its EOS ids, and the real EOS must be trained on. With `topk` > 0
    the samples' top-k fields (all ``[len(response_ids), topk]``) become ``[b, s, topk]`` tensors.
    """
    if not samples:
        zeros = torch.zeros((1, 2))
        out = MicroBatch(torch.full((1, 2), pad_id, dtype=torch.long), torch.arange(2)[None],
                         torch.full((1, 2), pad_id, dtype=torch.long), zeros.clone(), zeros.clone(),
                         zeros.clone(), zeros.clone(), torch.zeros((1, 1)), [], [], [])
        if topk:
            out.topk_ids, out.teacher_topk_logprobs, out.ref_topk_logprobs = _topk_padding(1, 2, topk)
        return out if device is None else _on(out, device)
    length = max(s.num_tokens for s in samples)
    batch = len(samples)
    tokens = torch.full((batch, length), pad_id, dtype=torch.long)
    mask, sampler, teacher, ref = (torch.zeros((batch, length)) for _ in range(4))
    for row, s in enumerate(samples):
        seq = s.prompt_ids + s.response_ids
        tokens[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        # response token j is predicted at position len(prompt) - 1 + j
        start, end = len(s.prompt_ids) - 1, len(s.prompt_ids) - 1 + len(s.response_ids)
        mask[row, start:end] = 1.0
        sampler[row, start:end] = _cpu_fp32(s.sampler_logprobs)
        teacher[row, start:end] = _cpu_fp32(s.teacher_logprobs)
        ref[row, start:end] = _cpu_fp32(s.ref_logprobs if s.ref_logprobs is not None else s.teacher_logprobs)
    targets = torch.full_like(tokens, pad_id)
    targets[:, :-1] = tokens[:, 1:]
    positions = torch.arange(length).unsqueeze(0).expand(batch, -1).contiguous()
    outcome = torch.tensor([[s.outcome_advantage] for s in samples])
    out = MicroBatch(tokens, positions, targets, mask, sampler, teacher, ref, outcome,
                     [s.teacher for s in samples], [s.lam for s in samples],
                     [s.ref_logprobs is not None for s in samples])
    if topk:
        ids, teacher_topk, ref_topk = _topk_padding(batch, length, topk)
        for row, s in enumerate(samples):
            if s.teacher_topk_ids is None or s.teacher_topk_ids.shape != (len(s.response_ids), topk):
                raise ValueError(f"sample {row} has no [response_len, {topk}] teacher top-k (scored "
                                 f"without ScoringPool.score(topk={topk})?)")
            start, end = len(s.prompt_ids) - 1, len(s.prompt_ids) - 1 + len(s.response_ids)
            ids[row, start:end] = s.teacher_topk_ids.to(torch.long).cpu()
            teacher_topk[row, start:end] = s.teacher_topk_logprobs.float().cpu()
            ref_source = s.ref_topk_logprobs if s.ref_topk_logprobs is not None else s.teacher_topk_logprobs
            ref_topk[row, start:end] = ref_source.float().cpu()
        out.topk_ids, out.teacher_topk_logprobs, out.ref_topk_logprobs = ids, teacher_topk, ref_topk
    return out if device is None else _on(out, device)


def _cpu_fp32(values) -> torch.Tensor:
    """A per-token list or tensor (on any device) as a CPU fp32 tensor."""
    return torch.as_tensor(values, dtype=torch.float32, device="cpu")


def _topk_padding(batch: int, length: int, topk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k tensors for positions without a response token: token 0, uniform log-probs."""
    uniform = torch.full((batch, length, topk), -math.log(topk + 1))
    return torch.zeros((batch, length, topk), dtype=torch.long), uniform, uniform.clone()


def _on(batch: MicroBatch, device: torch.device) -> MicroBatch:
    return MicroBatch(**{f.name: _to(getattr(batch, f.name), device) for f in dataclasses.fields(batch)})


def _to(value, device: torch.device):
    return value.to(device) if torch.is_tensor(value) else value
