"""The CPU compatibility layer: patches that let unmodified megatron-core (0.15/0.16) run on CPU.

`platform.init_distributed` installs it once at start-up in CPU mode (no CUDA, or
``GOPD_FORCE_CPU=1``); on GPU none of this is touched. Where megatron-core assumes CUDA, and what
`install_cpu_compat` does about it (none of it changes numerics):

- ``torch.cuda.current_device()`` is used as a ``device=`` argument throughout (rotary embeddings,
  tensor-parallel layers and mappings, pipeline p2p): it answers ``"cpu"``.
- literal ``device="cuda"`` in factory calls (the pipeline schedule's token counters): a torch
  function mode (`_CudaToCpuMode`) rewrites a CUDA ``device=`` to the CPU, and makes
  ``tensor.type()`` answer ``torch.cuda.*Tensor`` names, by which the optimizers and gradient
  clipping pick their code paths. It sees every torch call; `device_rewrites_paused` lifts it
  around hot loops that never name the device literally.
- ``Tensor.cuda()`` / ``Module.cuda()``, ``torch.cuda.synchronize``, ``set_device``,
  ``empty_cache`` and the memory counters: no-ops; streams and events (side streams of the MoE
  alltoall dispatcher and shared experts): inert stand-ins (`_Inert`).
- RNG: the model-parallel RNG tracker reads and writes "CUDA" generator states
  (``tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state``,
  ``torch.cuda.manual_seed``, ``get_rng_state``): mapped onto the CPU generator.
- ``transformer.utils.get_default_causal_mask`` (also imported by ``fusions.fused_softmax``)
  builds its mask on ``"cuda"``: replaced by a CPU one.
- MoE: ``moe_utils.te_general_gemm`` is referenced but undefined without Transformer Engine (a
  NameError in router gating in 0.16.1): defined as None, on GPU too (`install_device_independent_fixes`,
  the one patch that is not CPU-only). ``maybe_move_tensor_to_cpu`` converts
  only CUDA tensors, so the split sizes stay tensors and gloo's ``all_to_all_single`` rejects them:
  CPU tensors become numpy when ``as_numpy=True``.
- gloo's all_gather / reduce_scatter need equal sizes, which MoE dispatch with expert tensor
  parallelism does not give (NCCL accepts them): padded to the largest and cut back.

May import: torch and megatron-core only (it sits below everything in megatron_gopd).
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
import torch.distributed as dist


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


def install_device_independent_fixes() -> None:
    """Fixes megatron-core needs on every device, GPU included (`platform.init_distributed` applies
    them in both modes). Idempotent.

    - ``moe_utils.te_general_gemm`` is defined only when Transformer Engine imports, but 0.16.1's
      router gating references it unguarded: without TE every MoE forward raises NameError (on a
      GPU too). Defined as None, which is what the code tests for.
    """
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def install_cpu_compat() -> None:
    """Patch the CUDA assumptions of megatron-core (0.15/0.16) so that it runs on CPU. Idempotent.

    Every patch is listed in the module docstring; none changes numerics.
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
        output.copy_(full[start : start + output.shape[0]])
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

    install_device_independent_fixes()
    original_move = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        # Upstream converts CUDA tensors only; on CPU the split sizes must become numpy too, or
        # all_to_all_single rejects them.
        if torch.is_tensor(tensor) and not tensor.is_cuda and as_numpy:
            return tensor.numpy()
        return original_move(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
