"""Device and distributed start-up, and the CPU compatibility mode for megatron-core.

This is the only module that knows whether the job runs on CUDA (NCCL, production) or on CPU (gloo:
tests, CI and the demo). Everything else calls `device()` and the functions below and never branches
on the platform.

megatron-core assumes CUDA in a handful of places. On a machine without CUDA, or with
``GOPD_FORCE_CPU=1``, `init_distributed` installs the CPU compatibility layer (`cpu_compat`, whose
`install_cpu_compat` and `device_rewrites_paused` are also reachable from here), which patches exactly
those places once, so that the unmodified Megatron code paths (GPTModel, pipeline schedules, MoE
dispatch, RNG tracker, dist_checkpointing) run on CPU with gloo.

May import: torch, megatron-core and `megatron_gopd.cpu_compat`; everything else in megatron_gopd
may import it.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os
import random
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_gopd.cpu_compat import device_rewrites_paused, install_cpu_compat, install_device_independent_fixes

logger = logging.getLogger(__name__)

# megatron-core warns at import time about every optional fused kernel it cannot find; on CPU these
# are expected facts, not problems, and they bury real warnings.
for _message in ("Transformer Engine and Apex are not installed", "Apex is not installed", "full scope is deprecated"):
    warnings.filterwarnings("ignore", message=f".*{_message}.*")

FORCE_CPU_ENV = "GOPD_FORCE_CPU"


# ----------------------------------------------------------------------------------------------
# Which platform


@functools.lru_cache(maxsize=None)
def cpu_mode() -> bool:
    """True when running without CUDA (no GPU, or ``GOPD_FORCE_CPU=1``)."""
    forced = os.environ.get(FORCE_CPU_ENV, "").lower() in ("1", "true", "yes")
    return forced or not torch.cuda.is_available()


def device() -> torch.device:
    """The device this rank computes on: its local GPU, or the CPU in CPU mode."""
    if cpu_mode():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def backend() -> str:
    """The torch.distributed backend for this platform.

    CPU: gloo. GPU: NCCL for CUDA tensors and gloo for CPU tensors, so that host-side bookkeeping
    (metrics, counts, stop flags, which stay on the CPU to avoid device synchronisations) can use
    the same process groups as the model's collectives.
    """
    return "gloo" if cpu_mode() else "cpu:gloo,cuda:nccl"


def have_transformer_engine() -> bool:
    """Whether Transformer Engine imports (and may be used: never in CPU mode)."""
    if cpu_mode():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


# ----------------------------------------------------------------------------------------------
# Distributed start-up


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, as read from torchrun or Slurm."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int


def _first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm nodelist such as ``node[01-04,07],gpu3`` (no scontrol needed)."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist
    if "[" not in head:
        return head
    prefix, rest = head.split("[", 1)
    first = rest.split(",")[0].split("-")[0].rstrip("]")
    return prefix + first


def _free_local_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_dist_env(environ: Optional[dict[str, str]] = None) -> DistEnv:
    """Read rank and rendezvous from torchrun (RANK, WORLD_SIZE, ...) or Slurm (SLURM_PROCID, ...).

    torchrun's variables win when both are present (srun starting one torchrun agent per node).
    A bare ``python script.py`` is a world of one.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", "0"))
        local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local_rank = int(env.get("SLURM_LOCALID", "0"))
        local_world = int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    else:
        rank, world, local_rank, local_world = 0, 1, 0, 1
    addr = env.get("MASTER_ADDR")
    if addr is None:
        addr = _first_slurm_host(env["SLURM_JOB_NODELIST"]) if "SLURM_JOB_NODELIST" in env else "127.0.0.1"
    if "MASTER_PORT" in env:
        port = int(env["MASTER_PORT"])
    elif world == 1:  # nobody else joins: any free port, so that concurrent single-process jobs never collide
        port = _free_local_port()
    else:
        port = 29500
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of size {world}")
    return DistEnv(rank, world, local_rank, local_world, addr, port)


def init_distributed(timeout_minutes: int = 30) -> DistEnv:
    """Start torch.distributed for this process (idempotent) and return where it sits.

    Installs the CPU compatibility layer first in CPU mode; on GPU binds the process to its local
    device. A world of one is initialised too, so that Megatron's parallel state works in a plain
    ``python`` run.
    """
    env = read_dist_env()
    install_device_independent_fixes()
    if cpu_mode():
        install_cpu_compat()
    else:
        # modulo: under `srun --gpus-per-task=1` every task sees only its own GPU (device 0)
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        # env:// so that under torchrun the workers join the agent's store instead of opening one.
        dist.init_process_group(
            backend=backend(),
            init_method="env://",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    return env


def shutdown_distributed() -> None:
    """Tear down Megatron's parallel state and the default process group."""
    destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def init_model_parallel(tp: int = 1, pp: int = 1, ep: int = 1, etp: Optional[int] = None, seed: int = 1234) -> None:
    """Initialise Megatron's parallel state for the student's grid and seed every generator.

    `tp * pp` must divide the world; `ep` must divide the resulting data-parallel size (expert
    parallelism is carved out of data parallelism, as in Megatron).
    """
    from megatron.core import parallel_state

    world = dist.get_world_size()
    if world % (tp * pp) != 0:
        raise ValueError(
            f"tensor_parallel ({tp}) x pipeline_parallel ({pp}) = {tp * pp} does not divide the world size {world}"
        )
    etp = tp if etp is None else etp
    if (world // pp) % (ep * etp) != 0:
        raise ValueError(
            f"expert_parallel ({ep}) x expert_tensor_parallel ({etp}) does not divide "
            f"world / pipeline_parallel = {world // pp}"
        )
    destroy_model_parallel()
    with _recording_new_groups() as created:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep,
            expert_tensor_parallel_size=etp,
            create_gloo_process_groups=not cpu_mode(),  # in CPU mode every group already is gloo
        )
    _MEGATRON_GROUPS.extend(created)
    seed_everything(seed)


# Process groups created by the last `init_model_parallel`. Megatron's own destroy_model_parallel
# only forgets them; each live gloo group keeps threads, so re-initialising (tests, conversion at
# several layouts) would pile them up.
_MEGATRON_GROUPS: list = []


@contextlib.contextmanager
def _recording_new_groups():
    created: list = []
    new_group = dist.new_group

    def recording_new_group(*args, **kwargs):
        group = new_group(*args, **kwargs)
        created.append(group)
        return group

    dist.new_group = recording_new_group
    try:
        yield created
    finally:
        dist.new_group = new_group


def destroy_model_parallel() -> None:
    """Undo `init_model_parallel` (safe to call when nothing is initialised)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    while _MEGATRON_GROUPS:
        group = _MEGATRON_GROUPS.pop()
        if isinstance(group, dist.ProcessGroup) and dist.is_initialized():
            try:
                dist.destroy_process_group(group)
            except ValueError:  # megatron-core already destroyed it (its gloo groups, on GPU)
                pass
    from megatron.core.tensor_parallel import random as mpu_random

    mpu_random.get_cuda_rng_tracker().reset()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, torch and Megatron's model-parallel RNG tracker.

    Every rank gets the same base seed (identical initial weights across data-parallel ranks); the
    tracker gives tensor-parallel ranks their own stream for dropout inside TP regions.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if parallel_state.model_parallel_is_initialized():
        model_parallel_cuda_manual_seed(seed)
    # model_parallel_cuda_manual_seed reseeds the (CPU-mapped) default generator per stage; put the
    # common seed back so that model construction draws the same numbers on every rank.
    torch.manual_seed(seed)


__all__ = [
    "DistEnv",
    "FORCE_CPU_ENV",
    "backend",
    "cpu_mode",
    "destroy_model_parallel",
    "device",
    "device_rewrites_paused",
    "have_transformer_engine",
    "init_distributed",
    "init_model_parallel",
    "install_cpu_compat",
    "read_dist_env",
    "seed_everything",
    "shutdown_distributed",
]
