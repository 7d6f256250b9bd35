"""Collectives that keep the ranks of one model replica (its TP x PP group) in step during a rollout."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from typing import Iterable

import numpy as np
import torch
import torch.distributed as dist

from megatron_gopd.rollout.base import SamplingParams


def check_same_request(prompts: list[list[int]], sampling: SamplingParams, groups: Iterable,
                       device: torch.device) -> None:
    """Fail fast (RuntimeError) when the ranks of a replica were given different requests.

    Mismatched requests would otherwise deadlock or silently mix samples. One all-reduce per group
    (those of size > 1) of a 48-bit digest (exact in float64) and its negation: the max of both
    equals the digest on every rank only when all digests agree.
    """
    groups = [g for g in groups if g is not None and g.size() > 1]
    if not groups:
        return
    hasher = hashlib.blake2b(digest_size=6)
    hasher.update(np.array([len(p) for p in prompts], dtype=np.int64).tobytes())
    hasher.update(np.fromiter(itertools.chain.from_iterable(prompts), dtype=np.int64).tobytes())
    hasher.update(repr(dataclasses.astuple(sampling)).encode())
    digest = float(int.from_bytes(hasher.digest(), "big"))
    extremes = torch.tensor([digest, -digest], dtype=torch.float64, device=device)
    for group in groups:
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
    if extremes[0].item() != digest or -extremes[1].item() != digest:
        raise RuntimeError("the ranks of one model replica called generate() with different prompts or "
                           "sampling parameters; every TP / PP rank must pass the same request")
