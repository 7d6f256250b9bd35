"""The small distributed helpers every part of the job shares: one place, one behaviour.

* outside a job: `rank`, `barrier`, `broadcast_object` and `all_gather_object` also work when
  torch.distributed is not initialised (one process: rank 0, its own value), so the same code runs
  in a single-process tool and in every rank of a job;
* reductions: `all_reduce_dp` (sums / maxima over a data-parallel group, a no-op for a group of
  one) and `agree_on_micro_batch_count`;
* ragged tensors: `all_gather_varlen` (1-D tensors of different lengths, one per rank);
* failing together: `agree` raises on every rank when any rank failed, so that no rank is left
  waiting in the next collective;
* same-request checks: ranks that must pass identical requests (the ranks of one model replica)
  compare `fingerprint`s, either inside their own groups (`check_same_in_groups`, one all-reduce)
  or from values already gathered over the world (`check_same_within_groups`).

This module imports only torch and numpy: anything in the package may use it.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "agree",
    "agree_on_micro_batch_count",
    "all_gather_object",
    "all_gather_varlen",
    "all_reduce_dp",
    "barrier",
    "broadcast_object",
    "check_same_in_groups",
    "check_same_within_groups",
    "fingerprint",
    "int_sequences",
    "rank",
]


# ----------------------------------------------------------------------------------------------
# Safe outside a job


def rank() -> int:
    """This process's global rank; 0 when torch.distributed is not initialised."""
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    """Wait for every rank (nothing to wait for outside a job)."""
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank `src`'s `value` on every rank (a picklable object; `value` elsewhere is ignored)."""
    box = [value]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(value: Any) -> list[Any]:
    """Every rank's `value`, indexed by rank; ``[value]`` outside a job."""
    if not dist.is_initialized():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


# ----------------------------------------------------------------------------------------------
# Reductions


def all_reduce_dp(
    tensor: torch.Tensor, group: Optional[dist.ProcessGroup], op: dist.ReduceOp = dist.ReduceOp.SUM
) -> None:
    """In-place all-reduce of `tensor` over `group` (None: the world) with `op`.

    A no-op outside a job or when the group has a single rank, so single-replica runs pay nothing.
    """
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)


def agree_on_micro_batch_count(local_count: int, group: Optional[dist.ProcessGroup]) -> int:
    """The largest micro-batch count over the data-parallel `group` (every rank runs that many).

    Expert-parallel all-to-alls pair the forwards of data-parallel ranks up, so a rank with fewer
    micro-batches must run empty ones until the longest rank is done. None: no data parallelism.
    """
    count = torch.tensor([local_count], dtype=torch.long)
    if group is not None:
        all_reduce_dp(count, group, op=dist.ReduceOp.MAX)
    return int(count.item())


# ----------------------------------------------------------------------------------------------
# Ragged gathers and failing together


def all_gather_varlen(flat: torch.Tensor) -> list[torch.Tensor]:
    """All-gather 1-D tensors of different lengths over the world; one tensor per rank.

    Two all-gathers: the lengths, then every tensor zero-padded to the longest (gloo and NCCL
    need equal sizes); the padding is cut off again.
    """
    world = dist.get_world_size()
    size = torch.tensor([flat.numel()], dtype=torch.int64, device=flat.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    padded = flat.new_zeros(max(counts))
    padded[: flat.numel()] = flat
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return [g[:n] for g, n in zip(gathered, counts)]


def agree(error: Optional[BaseException], what: str, payload: Any = None) -> list[Any]:
    """Raise on every rank if `what` failed on any rank (so that no rank waits in a collective).

    Call it after a ``try`` that caught the local `error` (None when this rank succeeded): the rank
    that failed re-raises its own error, every other rank raises RuntimeError naming the first rank
    that failed and its message. Returns every rank's `payload` (one all-gather carries both).
    """
    message = None if error is None else f"{type(error).__name__}: {error}"
    gathered = all_gather_object((message, payload))
    failed = [(source, m) for source, (m, _) in enumerate(gathered) if m is not None]
    if error is not None:
        raise error
    if failed:
        source, message = failed[0]
        raise RuntimeError(f"{what} failed on rank {source}: {message}")
    return [p for _, p in gathered]


# ----------------------------------------------------------------------------------------------
# Same-request checks


def fingerprint(*parts: Any) -> int:
    """A 48-bit digest of `parts` (integer sequences, or anything with a stable ``repr``).

    48 bits: exact in float64, so digests can be compared with a floating-point all-reduce.
    Integer sequences are hashed as int64 bytes (fast for long token lists).
    """
    hasher = hashlib.blake2b(digest_size=6)
    for part in parts:
        if isinstance(part, np.ndarray):
            hasher.update(part.astype(np.int64).tobytes())
        else:
            hasher.update(repr(part).encode())
        hasher.update(b"|")
    return int.from_bytes(hasher.digest(), "big")


def int_sequences(sequences: Iterable[Sequence[int]]) -> np.ndarray:
    """Lengths, then the concatenated values of `sequences`, as one int64 array for `fingerprint`."""
    sequences = list(sequences)
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    values = np.fromiter((v for s in sequences for v in s), dtype=np.int64)
    return np.concatenate([lengths, values])


def check_same_in_groups(
    digest: int, groups: Sequence[Optional[dist.ProcessGroup]], message: str, device: Optional[torch.device] = None
) -> None:
    """Raise RuntimeError(`message`) on every rank of `groups` unless their `digest`s agree.

    One all-reduce (MAX) per group of the digest and its negation: both maxima give back the
    digest on every rank only when all digests agree. Groups of one rank (or None) are skipped.
    Only the ranks of the groups learn of a mismatch: use it where those ranks alone are about to
    run collectives together (e.g. one model replica's TP and PP groups).
    """
    active = [g for g in groups if g is not None and g.size() > 1]
    if not active:
        return
    extremes = torch.tensor([float(digest), -float(digest)], dtype=torch.float64, device=device)
    for group in active:
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
    if extremes[0].item() != digest or -extremes[1].item() != digest:
        raise RuntimeError(message)


def check_same_within_groups(
    values: Sequence[Any], leader_of_rank: Sequence[int], describe: Callable[[int, int], str]
) -> None:
    """Raise ValueError on every rank unless each rank's value equals its group leader's.

    `values` holds every rank's value (e.g. the payloads returned by `agree`) and
    `leader_of_rank` the rank each one must match; the message is ``describe(rank, leader)`` for the
    first rank that differs. Every rank sees the same `values`, so every rank raises together.
    """
    for source, value in enumerate(values):
        leader = leader_of_rank[source]
        if value != values[leader]:
            raise ValueError(describe(source, leader))
