"""Rank arithmetic of megatron_gopd.parallel (pure: no process groups)."""

from __future__ import annotations

from megatron_gopd.models import ParallelLayout
from megatron_gopd.parallel import (
    dense_grid,
    expert_grid,
    last_stage_of_rank,
    rank_groups,
    replica_partition,
    replica_writers,
    same_partition,
)


def test_rank_groups_match_megatron_rank_generator():
    from megatron.core.parallel_state import RankGenerator

    for tp, dp, pp in [(2, 1, 2), (1, 4, 1), (2, 2, 2), (1, 2, 4)]:
        generator = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order="tp-cp-ep-dp-pp")
        grid = {"tp": tp, "cp": 1, "dp": dp, "pp": pp}
        for dims, token in [
            (["tp"], "tp"),
            (["pp"], "pp"),
            (["dp"], "dp"),
            (["tp", "pp"], "tp-pp"),
            (["tp", "cp", "dp"], "tp-cp-dp"),
        ]:
            assert rank_groups(grid, dims) == generator.get_ranks(token), (tp, dp, pp, dims)


def test_expert_grid_matches_megatron_rank_generator():
    from megatron.core.parallel_state import RankGenerator

    layout, world = ParallelLayout(tp=1, pp=2, ep=2), 8
    expert = expert_grid(layout, world)
    assert expert == {"tp": 1, "ep": 2, "dp": 2, "pp": 2}
    generator = RankGenerator(tp=1, ep=2, dp=2, pp=2, cp=1, order="tp-ep-dp-pp", rank_offset=0)
    for dims, token in [(["ep"], "ep"), (["dp"], "dp"), (["tp", "ep", "pp"], "tp-ep-pp")]:
        assert rank_groups(expert, dims) == generator.get_ranks(token), dims


def test_replicas_writers_and_last_stages_of_a_tp2_pp2_model_on_8_ranks():
    # TP fastest, then DP, PP slowest: rank = tp + 2 * dp + 4 * pp.
    layout = ParallelLayout(tp=2, pp=2)
    assert dense_grid(layout, 8) == {"tp": 2, "cp": 1, "dp": 2, "pp": 2}
    assert replica_partition(layout, 8) == [0, 0, 1, 1, 0, 0, 1, 1]
    assert replica_writers(layout, 8) == [4, 6]  # last stage, TP rank 0, of each replica
    assert last_stage_of_rank(layout, 8) == [4, 5, 6, 7, 4, 5, 6, 7]


def test_same_partition_ignores_replica_numbering():
    student = replica_partition(ParallelLayout(tp=1, pp=2), 4)  # pipelines {0, 2} and {1, 3}
    assert student == [0, 1, 0, 1]
    assert same_partition(student, [1, 0, 1, 0])
    assert same_partition(student, replica_partition(ParallelLayout(pp=2), 4))
    assert not same_partition(student, replica_partition(ParallelLayout(tp=2), 4))  # {0, 1} and {2, 3}
    assert not same_partition(student, replica_partition(ParallelLayout(), 4))
