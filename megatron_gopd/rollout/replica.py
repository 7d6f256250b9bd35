"""Collectives that keep the ranks of one model replica (its TP x PP group) in step during a rollout."""

from __future__ import annotations

import dataclasses
from typing import Iterable

import torch

from megatron_gopd.collectives import check_same_in_groups, fingerprint, int_sequences
from megatron_gopd.rollout.base import SamplingParams


def check_same_request(
    prompts: list[list[int]], sampling: SamplingParams, groups: Iterable, device: torch.device
) -> None:
    """Fail fast (RuntimeError) when the ranks of a replica were given different requests.

    Mismatched requests would otherwise deadlock or silently mix samples. One small all-reduce per
    group (`collectives.check_same_in_groups`).
    """
    digest = fingerprint(int_sequences(prompts), dataclasses.astuple(sampling))
    check_same_in_groups(
        digest,
        tuple(groups),
        "the ranks of one model replica called generate() with different prompts or "
        "sampling parameters; every TP / PP rank must pass the same request",
        device=device,
    )
