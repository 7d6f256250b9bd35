"""The per-sample bookkeeping both rollout engines keep: tokens, log-probs, finish reason."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from megatron_gopd.rollout.base import FinishReason, RolloutBatch, RolloutSample, SamplingParams


@dataclasses.dataclass
class SampleRow:
    """One sample being generated (the same bookkeeping on every rank)."""

    sample_id: int
    """Position in the returned batch (prompt-major)."""
    prompt_index: int
    sample_index: int
    prompt: list[int]
    budget: int
    """Most tokens this sample may generate: max_new_tokens, or less where the context ends."""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    sampler_logprobs: list[float] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    finish_reason: Optional[FinishReason] = None


PendingLogprobs = list[tuple[Sequence[SampleRow], torch.Tensor, Optional[torch.Tensor]]]
"""Per sampling call: its rows, their sampler log-probs ``[k]`` and log-probs ``[k]`` (or None), on the device."""


def to_rollout_batch(rows: Sequence[SampleRow], sampling: SamplingParams) -> RolloutBatch:
    """The finished `rows` (prompt-major) as the engines' result; log-probs only if asked for."""
    return RolloutBatch(
        samples=[
            RolloutSample(
                prompt_index=r.prompt_index,
                sample_index=r.sample_index,
                token_ids=r.token_ids,
                sampler_logprobs=r.sampler_logprobs,
                logprobs=r.logprobs if sampling.return_logprobs else None,
                finish_reason=r.finish_reason,
            )
            for r in rows
        ]
    )


def record_token(row: SampleRow, token: int, eos_token_ids: Sequence[int], sampling: SamplingParams) -> None:
    """Append a sampled token and decide whether the sample has finished."""
    row.token_ids.append(token)
    if token in eos_token_ids:
        row.finish_reason = "eos"
    elif token in sampling.stop_token_ids:
        row.finish_reason = "stop"
    elif len(row.token_ids) >= row.budget:
        row.finish_reason = "length"


def append_pending_logprobs(pending: PendingLogprobs) -> None:
    """Append the log-probs kept on the device to their rows (one host copy for the whole batch).

    `pending` is in step order, so each row's values arrive in token order.
    """
    if not pending:
        return
    sampler_logprobs = torch.cat([sampler for _, sampler, _ in pending]).tolist()
    logprobs = torch.cat([lp for _, _, lp in pending]).tolist() if pending[0][2] is not None else None
    offset = 0
    for rows, _, _ in pending:
        for k, row in enumerate(rows):
            row.sampler_logprobs.append(sampler_logprobs[offset + k])
            if logprobs is not None:
                row.logprobs.append(logprobs[offset + k])
        offset += len(rows)


def pack_logprobs(rows: Sequence[SampleRow], with_logprobs: bool, device: torch.device) -> torch.Tensor:
    """``[columns, tokens]`` fp32: every row's sampler log-probs (then log-probs), for one broadcast."""
    flat = [r.sampler_logprobs for r in rows] + ([r.logprobs for r in rows] if with_logprobs else [])
    total = sum(len(r.token_ids) for r in rows)
    return torch.tensor([lp for lps in flat for lp in lps], dtype=torch.float32, device=device).view(
        1 + with_logprobs, total
    )


def unpack_logprobs(rows: Sequence[SampleRow], packed: torch.Tensor) -> None:
    """Give every row its slice of a `pack_logprobs` tensor received from the sampling rank."""
    values, offset = packed.tolist(), 0
    for row in rows:
        length = len(row.token_ids)
        row.sampler_logprobs = values[0][offset : offset + length]
        if len(values) == 2:
            row.logprobs = values[1][offset : offset + length]
        offset += length
