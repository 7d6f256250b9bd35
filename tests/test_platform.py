"""Distributed start-up from torchrun / Slurm variables, and the CPU compatibility mode for megatron-core."""

from __future__ import annotations

import pytest
import torch

from megatron_gopd import platform
from tests.dist_harness import run_distributed


def test_torchrun_environment():
    env = platform.read_dist_env(
        dict(RANK="3", WORLD_SIZE="8", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2", MASTER_ADDR="node7", MASTER_PORT="1234")
    )
    assert env == platform.DistEnv(3, 8, 1, 2, "node7", 1234)


def test_slurm_environment_without_torchrun():
    env = platform.read_dist_env(
        dict(
            SLURM_PROCID="5",
            SLURM_NTASKS="8",
            SLURM_LOCALID="1",
            SLURM_NTASKS_PER_NODE="4(x2)",
            SLURM_JOB_NODELIST="gpu[07-08,11],cpu1",
        )
    )
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 4)
    assert env.master_addr == "gpu07" and env.master_port == 29500


def test_torchrun_wins_over_slurm_and_bare_run_is_world_of_one():
    env = platform.read_dist_env(dict(RANK="1", WORLD_SIZE="2", SLURM_PROCID="0", SLURM_NTASKS="1"))
    assert (env.rank, env.world_size) == (1, 2)
    assert platform.read_dist_env({}).world_size == 1
    with pytest.raises(ValueError, match="outside a world"):
        platform.read_dist_env(dict(RANK="2", WORLD_SIZE="2"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "nodelist, first", [("node1", "node1"), ("a[3-5]", "a3"), ("x[01,04]", "x01"), ("h1,h2", "h1")]
)
def test_first_slurm_host(nodelist, first):
    assert platform._first_slurm_host(nodelist) == first


def _cpu_mode_body(rank: int, world_size: int) -> dict:
    import torch.distributed as dist
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    from megatron.core.transformer.utils import get_default_causal_mask

    platform.init_model_parallel(tp=2, seed=5)
    checks = {"cpu_mode": platform.cpu_mode(), "backend": dist.get_backend()}
    # megatron-core's literal CUDA devices land on the CPU
    checks["factory_device"] = str(torch.zeros(2, device="cuda").device)
    checks["tensor_cuda_noop"] = str(torch.ones(1).cuda().device)
    checks["current_device"] = str(torch.empty(1, device=torch.cuda.current_device()).device)
    checks["causal_mask"] = get_default_causal_mask(3).tolist()
    # the model-parallel RNG stream differs per TP rank and leaves the default stream untouched
    before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        tp_draw = torch.rand(1).item()
    checks["default_stream_restored"] = torch.equal(before, torch.get_rng_state())
    draws = [torch.zeros(1) for _ in range(world_size)]
    dist.all_gather(draws, torch.tensor([tp_draw]))
    checks["tp_streams_differ"] = draws[0].item() != draws[1].item()
    # gloo collectives with unequal first dimensions (MoE token dispatch)
    mine = torch.full((rank + 1, 2), float(rank))
    gathered = [torch.empty(r + 1, 2) for r in range(world_size)]
    dist.all_gather(gathered, mine)
    checks["uneven_gather"] = [g[:, 0].tolist() for g in gathered]
    out = torch.empty(rank + 1)
    dist.reduce_scatter(out, [torch.ones(r + 1) * (rank + 1) for r in range(world_size)])
    checks["uneven_reduce_scatter"] = out.tolist()
    return checks


@pytest.mark.slow
def test_cpu_compat_mode_on_two_ranks():
    results = run_distributed(_cpu_mode_body, world_size=2)
    for rank, checks in enumerate(results):
        assert checks["cpu_mode"] and checks["backend"] == "gloo"
        assert checks["factory_device"] == checks["tensor_cuda_noop"] == checks["current_device"] == "cpu"
        assert checks["causal_mask"] == [[False, True, True], [False, False, True], [False, False, False]]
        assert checks["default_stream_restored"] and checks["tp_streams_differ"]
        assert checks["uneven_gather"] == [[0.0], [1.0, 1.0]]
        assert checks["uneven_reduce_scatter"] == [3.0] * (rank + 1)


def test_force_cpu_environment_variable(monkeypatch):
    monkeypatch.setenv(platform.FORCE_CPU_ENV, "1")
    platform.cpu_mode.cache_clear()
    try:
        assert platform.cpu_mode() and platform.backend() == "gloo" and platform.device().type == "cpu"
        assert not platform.have_transformer_engine()
    finally:
        platform.cpu_mode.cache_clear()


@pytest.mark.slow
def test_parallel_sizes_must_fit_the_world():
    results = run_distributed(_bad_grid_body, world_size=2)
    assert all("does not divide the world size 2" in r for r in results)


def _bad_grid_body(rank: int, world_size: int) -> str:
    try:
        platform.init_model_parallel(tp=2, pp=2)
    except ValueError as err:
        return str(err)
    return "no error"


def test_the_moe_te_guard_is_not_cpu_only():
    """megatron-core 0.16.1's router gating names ``te_general_gemm``, which exists only when
    Transformer Engine imports: without TE every MoE forward raised NameError on a GPU too. The guard
    is a device-independent fix that `init_distributed` installs in both modes."""
    import inspect

    from megatron.core.transformer.moe import moe_utils

    from megatron_gopd import platform
    from megatron_gopd.cpu_compat import install_device_independent_fixes

    saved = moe_utils.__dict__.pop("te_general_gemm", "absent")
    try:
        install_device_independent_fixes()
        assert hasattr(moe_utils, "te_general_gemm")
        if saved == "absent":
            assert moe_utils.te_general_gemm is None
    finally:
        if saved != "absent":
            moe_utils.te_general_gemm = saved
    body = inspect.getsource(platform.init_distributed)
    assert body.index("install_device_independent_fixes()") < body.index("if cpu_mode():")
