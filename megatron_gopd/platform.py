"""Device and distributed start-up, and the CPU compatibility mode for megatron-core.

This is the only module that knows whether the job runs on CUDA (NCCL, production) or on CPU (gloo:
tests, CI and the demo). Everything else calls `device()` and the functions below and never branches
on the platform.

megatron-core assumes CUDA in a handful of places (see shared/megatron-core-on-cpu.md). On a machine
without CUDA, or with ``GOPD_FORCE_CPU=1``, `install_cpu_compat()` patches exactly those places once
at start-up, so that the unmodified Megatron code paths (GPTModel, pipeline schedules, MoE dispatch,
RNG tracker, dist_checkpointing) run on CPU with gloo.
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
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# megatron-core warns at import time about every optional fused kernel it cannot find; on CPU these
# are expected facts, not problems, and they bury real warnings.
for _message in ("Transformer Engine and Apex are not installed", "Apex is not installed",
                 "full scope is deprecated"):
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
    port = int(env.get("MASTER_PORT", "29500"))
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


def init_model_parallel(tp: int = 1, pp: int = 1, ep: int = 1, etp: Optional[int] = None,
                        seed: int = 1234) -> None:
    """Initialise Megatron's parallel state for the student's grid and seed every generator.

    `tp * pp` must divide the world; `ep` must divide the resulting data-parallel size (expert
    parallelism is carved out of data parallelism, as in Megatron).
    """
    from megatron.core import parallel_state

    world = dist.get_world_size()
    if world % (tp * pp) != 0:
        raise ValueError(f"tensor_parallel ({tp}) x pipeline_parallel ({pp}) = {tp * pp} does not "
                         f"divide the world size {world}")
    etp = tp if etp is None else etp
    if (world // pp) % (ep * etp) != 0:
        raise ValueError(f"expert_parallel ({ep}) x expert_tensor_parallel ({etp}) does not divide "
                         f"world / pipeline_parallel = {world // pp}")
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


# ----------------------------------------------------------------------------------------------
# CPU compatibility layer


class _Inert:
    """Stand-in for torch.cuda.Stream / Event: accepts any call, does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        # stream.record_event() must return something that can be synchronised in turn.
        return lambda *args, **kwargs: _Inert()

    def __enter__(self) -> "_Inert":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def _is_cuda_device(value: Any) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        return value.startswith("cuda")
    return False


class _CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """Makes CPU tensors pass for the device's tensors in megatron-core.

    Rewrites ``device="cuda"`` in any torch call to the CPU, and makes ``tensor.type()`` (no
    arguments) answer ``torch.cuda.FloatTensor`` for a CPU float tensor: Megatron's optimizers and
    gradient clipping select their code paths by those names.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if func in (torch.Tensor.to, torch.Tensor.cuda) and args:
            args = tuple("cpu" if _is_cuda_device(a) else a for a in args)
        return func(*args, **kwargs)


_CPU_COMPAT_INSTALLED = False
_CPU_FUNCTION_MODE: Optional[_CudaToCpuMode] = None


@contextlib.contextmanager
def device_rewrites_paused():
    """Run a hot loop without the CPU layer's per-call ``device="cuda"`` rewriting.

    The rewriting mode sees every torch call; in a one-token decode step of a small model that
    costs a third of the step. Megatron's inference forward never names the device literally (it
    asks ``torch.cuda.current_device()``, which the CPU layer answers with the CPU), so the
    rollout engine's decode loop runs without it. A no-op on GPU, and when another torch function
    mode sits above it.
    """
    mode = _CPU_FUNCTION_MODE
    if mode is None or torch.overrides._get_current_function_mode() is not mode:
        yield
        return
    mode.__exit__(None, None, None)
    try:
        yield
    finally:
        mode.__enter__()


def install_cpu_compat() -> None:
    """Patch the CUDA assumptions of megatron-core (0.15/0.16) so that it runs on CPU. Idempotent.

    Every patch is listed in shared/megatron-core-on-cpu.md; none changes numerics.
    """
    global _CPU_COMPAT_INSTALLED, _CPU_FUNCTION_MODE
    if _CPU_COMPAT_INSTALLED:
        return
    _CPU_COMPAT_INSTALLED = True

    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"  # used as a `device=` argument throughout megatron-core
    cuda.synchronize = lambda *a, **k: None
    cuda.set_device = lambda *a, **k: None
    cuda.current_stream = lambda *a, **k: _Inert()
    cuda.default_stream = lambda *a, **k: _Inert()
    cuda.Stream = _Inert
    cuda.Event = _Inert
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.empty_cache = lambda: None
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    # RNG: Megatron's tracker keeps "CUDA" generator states; map them onto the CPU generator.
    # (torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly.)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self

    _patch_uneven_collectives()
    _CPU_FUNCTION_MODE = _CudaToCpuMode()
    _CPU_FUNCTION_MODE.__enter__()  # stays on for the life of the process

    _patch_megatron_for_cpu()


def _patch_uneven_collectives() -> None:
    """Let all_gather / reduce_scatter take lists of unequal first-dim sizes, as NCCL does.

    Megatron's MoE dispatch with expert tensor parallelism gathers a different number of tokens from
    every rank; gloo requires equal sizes. Pad to the largest, run the collective, cut the padding.
    """
    all_gather, reduce_scatter = dist.all_gather, dist.reduce_scatter

    def uneven_all_gather(tensor_list, tensor, group=None, async_op=False):
        rows = [t.shape[0] for t in tensor_list]
        if len(set(rows)) <= 1 and tensor.shape[0] == rows[0]:
            return all_gather(tensor_list, tensor, group=group, async_op=async_op)
        longest = max(rows)
        padded_input = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded_input[: tensor.shape[0]] = tensor
        padded_outputs = [tensor.new_empty((longest, *tensor.shape[1:])) for _ in tensor_list]
        all_gather(padded_outputs, padded_input, group=group)
        for out, padded in zip(tensor_list, padded_outputs):
            out.copy_(padded[: out.shape[0]])
        return None

    def uneven_reduce_scatter(output, input_list, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if len({t.shape for t in input_list}) <= 1 and output.shape == input_list[0].shape:
            return reduce_scatter(output, input_list, op=op, group=group, async_op=async_op)
        full = torch.cat([t.contiguous() for t in input_list])
        dist.all_reduce(full, op=op, group=group)
        rank = dist.get_rank(group)
        start = sum(t.shape[0] for t in input_list[:rank])
        output.copy_(full[start: start + output.shape[0]])
        return None

    dist.all_gather = uneven_all_gather
    dist.reduce_scatter = uneven_reduce_scatter


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _patch_megatron_for_cpu() -> None:
    from megatron.core.tensor_parallel import random as mpu_random

    mpu_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mpu_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    from megatron.core.transformer import utils as transformer_utils

    transformer_utils.get_default_causal_mask = _cpu_causal_mask
    try:
        from megatron.core.fusions import fused_softmax

        fused_softmax.get_default_causal_mask = _cpu_causal_mask
    except ImportError:
        pass

    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None  # referenced unguarded in 0.16.1 when TE is absent
    original_move = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        # Upstream converts CUDA tensors only; on CPU the split sizes must become numpy too, or
        # all_to_all_single rejects them.
        if torch.is_tensor(tensor) and not tensor.is_cuda and as_numpy:
            return tensor.numpy()
        return original_move(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
