"""Process groups for a model at any parallel layout, in the processes that already hold another.

A model at ``(tp, pp, ep)`` splits the ``world`` ranks of the job into ``DP = world / (tp * pp)``
replicas with Megatron's rank order ``tp-cp-ep-dp-pp`` (TP fastest, PP slowest), so a TP=2/PP=2
teacher sits beside a TP=1/DP=4 student in the same processes. `build_grid` creates every process
group a Megatron GPTModel, its MoE layers and the pipeline schedules read (a
`ProcessGroupCollection`) for one layout, without touching Megatron's global parallel state, which
keeps describing the student. A `GroupFactory` creates the groups of each distinct member set once,
so models sharing ranks share communicators, and destroys them all when closed.

The rank arithmetic (`rank_groups`, `replica_partition`, `replica_writers`, `last_stage_of_rank`)
is pure and needs no process group. This module imports only torch, numpy and `models`
(megatron.core lazily, inside `build_grid`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch.distributed as dist

from megatron_gopd.models import ParallelLayout

__all__ = [
    "GroupFactory",
    "ModelGrid",
    "build_grid",
    "check_megatron_layout",
    "dense_grid",
    "expert_grid",
    "last_stage_of_rank",
    "rank_groups",
    "replica_partition",
    "replica_writers",
    "same_partition",
]


# ----------------------------------------------------------------------------------------------
# Rank arithmetic (pure)


def rank_groups(grid: dict[str, int], dims: Sequence[str]) -> list[list[int]]:
    """Rank lists of the groups spanning `dims` of a grid, as Megatron's RankGenerator makes them.

    `grid` maps dimension names to sizes, fastest-varying first (Megatron's order string
    ``tp-cp-ep-dp-pp`` reads the same way). Equivalent to `HyperCommGrid.get_rank_enum`, which
    needs einops (not a dependency of this project).
    """
    names = list(grid)[::-1]  # slowest first: the axes of the rank array
    ranks = np.arange(int(np.prod(list(grid.values())))).reshape([grid[n] for n in names])
    keep = [i for i, n in enumerate(names) if n not in dims]
    span = [i for i, n in enumerate(names) if n in dims]
    size = int(np.prod([grid[n] for n in dims]))
    return ranks.transpose(keep + span).reshape(-1, size).tolist()


def dense_grid(layout: ParallelLayout, world: int) -> dict[str, int]:
    """The grid of the attention / dense layers: ``tp, cp (1), dp, pp``, fastest first."""
    return {"tp": layout.tp, "cp": 1, "dp": world // (layout.tp * layout.pp), "pp": layout.pp}


def expert_grid(layout: ParallelLayout, world: int) -> dict[str, int]:
    """The grid of the MoE layers: expert TP, EP and the expert data parallelism left over, then PP."""
    etp, ep = layout.expert_tp, layout.ep
    return {"tp": etp, "ep": ep, "dp": world // (layout.pp * ep * etp), "pp": layout.pp}


def replica_partition(layout: ParallelLayout, world: int) -> list[int]:
    """Data-parallel replica of every global rank under `layout` (Megatron's rank order)."""
    dp_of_rank = [0] * world
    for replica, ranks in enumerate(rank_groups(dense_grid(layout, world), ["tp", "pp"])):
        for rank in ranks:
            dp_of_rank[rank] = replica
    return dp_of_rank


def same_partition(a: Sequence[int], b: Sequence[int]) -> bool:
    """Whether two rank -> replica maps group the ranks identically (replica numbering aside)."""

    def groups(replica_of: Sequence[int]) -> set[frozenset[int]]:
        return {frozenset(r for r in range(len(replica_of)) if replica_of[r] == v) for v in set(replica_of)}

    return groups(a) == groups(b)


def replica_writers(layout: ParallelLayout, world: int) -> list[int]:
    """Per replica, the rank that holds its results: the last pipeline stage's TP rank 0."""
    dp_of_rank = replica_partition(layout, world)
    writers = [0] * (world // (layout.tp * layout.pp))
    for pipeline in rank_groups(dense_grid(layout, world), ["pp"]):
        last = pipeline[-1]
        if last % layout.tp == 0:  # TP rank 0 (TP is the fastest dimension)
            writers[dp_of_rank[last]] = last
    return writers


def last_stage_of_rank(layout: ParallelLayout, world: int) -> list[int]:
    """Per global rank, the global rank of the last pipeline stage of its pipeline."""
    last = [0] * world
    for pipeline in rank_groups(dense_grid(layout, world), ["pp"]):
        for rank in pipeline:
            last[rank] = pipeline[-1]
    return last


# ----------------------------------------------------------------------------------------------
# Process groups


class GroupFactory:
    """Creates process groups once per distinct member set, and destroys them all on `close`.

    Every rank must call `group` with the same rank lists in the same order (``dist.new_group`` is
    collective over the world); a member set seen before returns the same group, so the owner holds
    one gloo / NCCL communicator per distinct set of ranks, however many models and roles use it.
    """

    def __init__(self) -> None:
        self._groups: dict[tuple[int, ...], Any] = {}
        self._rank = dist.get_rank()

    def group(self, rank_lists: list[list[int]], optional: bool = False) -> Optional[dist.ProcessGroup]:
        """The group of `rank_lists` this rank belongs to (creating all of them if new).

        With `optional`, a rank in none of them gets None (Megatron's convention for the embedding
        groups, which only the first and last pipeline stages join).
        """
        mine = None
        for ranks in rank_lists:
            key = tuple(sorted(ranks))
            if key not in self._groups:
                self._groups[key] = dist.new_group(ranks=list(key))
            if self._rank in key:
                mine = self._groups[key]
        if mine is None and not optional:
            raise RuntimeError(f"rank {self._rank} is in none of the groups {rank_lists}")
        return mine

    def close(self) -> None:
        """Destroy every group created (collective; each live gloo group keeps threads of its own)."""
        for group in self._groups.values():
            if isinstance(group, dist.ProcessGroup) and dist.is_initialized():
                dist.destroy_process_group(group)
        self._groups.clear()


@dataclass
class ModelGrid:
    """One layout's process groups and where every rank sits in it."""

    layout: ParallelLayout
    pg_collection: Any
    """megatron.core.process_groups_config.ProcessGroupCollection of this layout."""
    dp_of_rank: list[int]
    """Data-parallel replica of every global rank."""
    writer_of_replica: list[int]
    """Per replica, the rank that contributes its results: last pipeline stage, TP rank 0."""
    last_stage_in_my_pp_group: int
    """Global rank of the last pipeline stage of this rank's pipeline."""

    @property
    def dp_size(self) -> int:
        """Number of data-parallel replicas."""
        return len(self.writer_of_replica)

    @property
    def dp_rank(self) -> int:
        """This rank's replica."""
        return self.dp_of_rank[dist.get_rank()]

    @property
    def is_last_stage(self) -> bool:
        """Whether this rank runs the last pipeline stage (where the logits are)."""
        return self.pg_collection.pp.rank() == self.layout.pp - 1


def build_grid(layout: ParallelLayout, factory: GroupFactory) -> ModelGrid:
    """Every group GPTModel, its MoE layers and the pipeline schedules read from a collection.

    Collective over the world: every rank calls it with the same layouts in the same order.
    """
    from megatron.core.process_groups_config import ProcessGroupCollection

    world = dist.get_world_size()
    dense, expert = dense_grid(layout, world), expert_grid(layout, world)
    pgs = ProcessGroupCollection()
    for name, dims in (
        ("tp", ["tp"]),
        ("cp", ["cp"]),
        ("dp", ["dp"]),
        ("pp", ["pp"]),
        ("tp_cp", ["tp", "cp"]),
        ("dp_cp", ["cp", "dp"]),
        ("mp", ["tp", "pp"]),
        ("tp_dp_cp", ["tp", "cp", "dp"]),
    ):
        setattr(pgs, name, factory.group(rank_groups(dense, dims)))
    for name, dims in (
        ("ep", ["ep"]),
        ("expt_tp", ["tp"]),
        ("tp_ep", ["tp", "ep"]),
        ("expt_dp", ["dp"]),
        ("tp_ep_pp", ["tp", "ep", "pp"]),
    ):
        setattr(pgs, name, factory.group(rank_groups(expert, dims)))
    pipelines = rank_groups(dense, ["pp"])
    # Word embeddings live on the first and last stage (tied weights are synchronised there), the
    # position embedding on the first; as parallel_state.default_embedding_ranks.
    pgs.embd = factory.group([[p[0], p[-1]] if len(p) > 1 else [p[0]] for p in pipelines], optional=True)
    pgs.pos_embd = factory.group([[p[0]] for p in pipelines], optional=True)
    return ModelGrid(
        layout,
        pgs,
        replica_partition(layout, world),
        replica_writers(layout, world),
        last_stage_of_rank(layout, world)[dist.get_rank()],
    )


def check_megatron_layout(layout: ParallelLayout, expected_dp_rank: int) -> None:
    """Refuse (ValueError) a student `layout` that disagrees with Megatron's global parallel state.

    Compares TP, PP and this rank's data-parallel rank; does nothing before the parallel state is
    initialised.
    """
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return
    actual = (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_data_parallel_rank(),
    )
    if actual != (layout.tp, layout.pp, expected_dp_rank):
        raise ValueError(
            f"student_layout tp={layout.tp} pp={layout.pp} (data-parallel rank "
            f"{expected_dp_rank}) does not match Megatron's parallel state tp={actual[0]} "
            f"pp={actual[1]} (data-parallel rank {actual[2]}): pass the student's layout"
        )
