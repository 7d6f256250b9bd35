"""The fast rollout engine: continuous batching over KV slots with one functional forward.

`FastRolloutEngine` gives the same samples as `MegatronRolloutEngine` (same per-sample uniform
streams, same sampling functions; in fp32 the same tokens) at a fraction of the cost:

* Each distinct prompt is prefilled once, whole, packed with the other prompts admitted with it;
  its keys (rotated once, at their true positions) and values are copied into the slots of its n
  samples. A prompt whose samples are admitted at different times is copied from a live sibling's
  slot, or prefilled again when none is left.
* A fixed set of KV slots, sized by a memory budget (``kv_cache_gb``, or a fraction of the free
  device memory on CUDA), never by batch x max_new_tokens. A finished sample frees its slot at
  once and the next queued sample takes it, its prompt prefilled under a token budget per round.
  Live samples are kept in the lowest slots (compacted when the queue has run dry), so a decode
  step runs over a short prefix of the slots.
* The decode step (`fast_model.decode_step`) writes only into the preallocated slots and reads
  each sample's own keys with no GQA expansion. On CUDA it is captured, sampling included, into a
  CUDA graph per (batch bucket, key-length bucket); on CPU it runs eagerly.

Every rank of one TP group runs the same schedule: the forward runs on Megatron's TP shards in
place, TP rank 0 samples and broadcasts the tokens every step, and the log-probs once at the end.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_gopd import platform
from megatron_gopd.models import ModelArchitecture
from megatron_gopd.rollout.base import RolloutBatch, RolloutEngine, SamplingParams, validate_request
from megatron_gopd.rollout.fast_attention import grouped_decode_attention
from megatron_gopd.rollout.fast_model import decode_step, decoder_weights, rope_tables
from megatron_gopd.rollout.fast_schedule import _Run, _Sample
from megatron_gopd.rollout.fast_support import fast_engine_unsupported_reason
from megatron_gopd.rollout.kv_slots import DEFAULT_CPU_KV_CACHE_GB, GB, KVSlots, KVSlotShape, slots_for_budget
from megatron_gopd.rollout.megatron_engine import GenerationStats
from megatron_gopd.rollout.replica import check_same_request
from megatron_gopd.rollout.sample_rows import (
    pack_logprobs,
    to_rollout_batch,
    unpack_logprobs,
)
from megatron_gopd.rollout.sampling import UniformStreams, sample_from_logits, sample_seed

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class FastGenerationStats(GenerationStats):
    """`GenerationStats` plus the slot figures of the last `generate` (``engine.last_stats``)."""

    slots: int = 0
    """KV slots this request ran with."""
    slot_tokens: int = 0
    """Positions per slot (the longest prompt + response of the request)."""
    kv_cache_bytes: int = 0
    """Bytes of the KV buffers on this rank."""
    prompt_prefills: int = 0
    """Prompts prefilled (a prompt is prefilled again only when no live sibling holds its KV)."""
    prefill_tokens: int = 0
    """Prompt tokens run through prefill forwards."""
    occupancy_while_queued: float = 0.0
    """Mean fraction of slots live over the decode steps taken while samples were still queued."""
    occupancy: float = 0.0
    """Mean fraction of slots live over all decode steps."""
    attention_backend: str = ""
    cuda_graphs: int = 0
    """CUDA graphs captured so far (kept until `release`)."""
    decode_host_seconds: float = 0.0
    """Host time of the decode steps up to the launch of their device work (before waiting for the
    sampled tokens): on CUDA, the part of a step the GPU may wait for."""


class FastRolloutEngine(RolloutEngine):
    """Continuous-batching sampler over the student's Megatron parameters in place (dense, local spec).

    Args:
        model: this rank's student (a `GPTModel`, possibly DDP-wrapped), one pipeline stage.
        arch: its architecture.
        eos_token_ids: tokens that end a sample with finish reason ``eos``.
        max_sequence_length: the longest prompt + response, default ``arch.max_position_embeddings``.
        kv_cache_gb: KV budget per rank in GB (1e9 bytes). None: ``kv_cache_memory_fraction`` of the
            free device memory at each `generate` on CUDA, `DEFAULT_CPU_KV_CACHE_GB` on CPU.
        kv_cache_memory_fraction: see `kv_cache_gb`; in (0, 1].
        max_slots: at most this many slots (None: as many as the budget holds and the request needs).
        prefill_token_budget: prompt tokens prefilled per admission round (at least one prompt).
        continuous_batching: refill a freed slot at once (True); False waits until every slot is
            free, i.e. static batching of the same slot count (kept for measuring the difference).
        cuda_graphs: capture the decode step per batch bucket on CUDA at TP=1 (eager elsewhere).

    Raises ValueError, before any model work, for a model the engine cannot run (see
    `fast_engine_unsupported_reason`), a KV budget that holds no sample of ``max_sequence_length``
    tokens, or ``max_slots < 1``.

    The parameters are read as they are at each forward: with the distributed optimizer's
    overlapped parameter gather, force the gather before generating, or the engine samples from
    stale weights. Call `release` before training to give the KV slots back.
    """

    def __init__(
        self,
        model,
        arch: ModelArchitecture,
        *,
        eos_token_ids: Sequence[int] = (),
        max_sequence_length: Optional[int] = None,
        kv_cache_gb: Optional[float] = None,
        kv_cache_memory_fraction: float = 0.9,
        max_slots: Optional[int] = None,
        prefill_token_budget: int = 8192,
        continuous_batching: bool = True,
        cuda_graphs: bool = True,
    ) -> None:
        from megatron.core.utils import get_model_config

        reason = fast_engine_unsupported_reason(model, arch)
        if reason is not None:
            raise ValueError(f"the fast rollout engine cannot run this student: {reason}")
        self.model, self.arch = model, arch
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        outside = [t for t in self.eos_token_ids if not 0 <= t < arch.vocab_size]
        if outside:
            raise ValueError(f"eos_token_ids {outside} are outside the vocabulary [0, {arch.vocab_size})")
        self.max_sequence_length = max_sequence_length or arch.max_position_embeddings
        if not 1 < self.max_sequence_length <= arch.max_position_embeddings:
            raise ValueError(
                f"max_sequence_length={self.max_sequence_length} must be in "
                f"(1, max_position_embeddings={arch.max_position_embeddings}]"
            )
        if max_slots is not None and (not isinstance(max_slots, int) or max_slots < 1):
            raise ValueError(f"max_slots must be an int >= 1 or None, got {max_slots!r}")
        if kv_cache_gb is not None and not kv_cache_gb > 0:
            raise ValueError(f"kv_cache_gb must be > 0 or None, got {kv_cache_gb!r}")
        if not 0 < kv_cache_memory_fraction <= 1:
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {kv_cache_memory_fraction!r}")
        if prefill_token_budget < 1:
            raise ValueError(f"prefill_token_budget must be >= 1, got {prefill_token_budget}")
        self.max_slots, self.kv_cache_gb = max_slots, kv_cache_gb
        self.kv_cache_memory_fraction = kv_cache_memory_fraction
        self.prefill_token_budget, self.continuous_batching = prefill_token_budget, continuous_batching

        self.device = platform.device()
        self.weights = decoder_weights(model)
        self.tp_group = self.weights.tp_group
        self.is_sampler = self.tp_group is None or self.tp_group.rank() == 0
        self._sampler_rank = dist.get_process_group_ranks(self.tp_group)[0] if self.tp_group is not None else 0
        self.dtype = get_model_config(model).params_dtype
        self.slot_shape = KVSlotShape.for_model(arch, self.weights.tp_size, self.dtype)
        if self.kv_cache_gb is not None or self.device.type != "cuda":
            # The whole configured context must fit in one slot, or no request could be served.
            slots_for_budget(self.slot_shape, self.max_sequence_length, self._budget_bytes())
        self.use_cuda_graphs = cuda_graphs and self.device.type == "cuda" and self.tp_group is None
        self.cache: Optional[KVSlots] = None
        self._rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._graphs: dict[tuple, tuple] = {}
        self._graph_pool = None
        self.last_stats = FastGenerationStats()

    # ------------------------------------------------------------------------------------------
    # Memory

    def _budget_bytes(self) -> float:
        """The KV budget of this rank, in bytes."""
        if self.kv_cache_gb is not None:
            return self.kv_cache_gb * GB
        if self.device.type == "cuda":
            free_bytes, _ = torch.cuda.mem_get_info(self.device)
            held = self.cache.nbytes if self.cache is not None else 0  # ours, reusable
            return (free_bytes + held) * self.kv_cache_memory_fraction
        return DEFAULT_CPU_KV_CACHE_GB * GB

    def _slots_for(self, samples: int, slot_tokens: int) -> KVSlots:
        """KV buffers for `samples` samples of up to `slot_tokens` positions (reused when they fit)."""
        what = (
            "kv_cache_gb"
            if self.kv_cache_gb is not None
            else (
                f"kv_cache_memory_fraction ({self.kv_cache_memory_fraction} of free memory)"
                if self.device.type == "cuda"
                else f"the CPU default kv_cache_gb={DEFAULT_CPU_KV_CACHE_GB}"
            )
        )
        slots = min(
            slots_for_budget(self.slot_shape, slot_tokens, self._budget_bytes(), what=what),
            samples,
            self.max_slots or samples,
        )
        if self.cache is None or not self.cache.fits(slots, slot_tokens):
            self.release()
            self.cache = KVSlots(self.slot_shape, slots, slot_tokens, self.device)
        return self.cache

    def release(self) -> None:
        """Free the KV slots, CUDA graphs and RoPE tables (call before training); the next
        `generate` allocates them again."""
        self.cache, self._rope, self._graph_pool = None, None, None
        self._graphs.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------------------------------
    # Public API

    def generate(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        sampling: SamplingParams,
        *,
        max_new_tokens_per_prompt: Optional[Sequence[int]] = None,
    ) -> RolloutBatch:
        """Sample ``sampling.n`` responses per prompt; every rank of the TP group gets the batch.

        See `RolloutEngine.generate`. `max_new_tokens_per_prompt` optionally gives each prompt its
        own response limit in place of ``sampling.max_new_tokens`` (tasks with their own budgets;
        benchmarks with controlled lengths). Raises ValueError before any generation for bad input
        (and for a KV budget that holds no sample of this request), RuntimeError when the ranks of
        the TP group were given different requests.
        """
        validate_request(
            prompt_token_ids,
            sampling,
            max_sequence_length=self.max_sequence_length,
            vocab_size=self.arch.vocab_size,
            eos_token_ids=self.eos_token_ids,
        )
        limits = [sampling.max_new_tokens] * len(prompt_token_ids)
        if max_new_tokens_per_prompt is not None:
            limits = [int(n) for n in max_new_tokens_per_prompt]
            if len(limits) != len(prompt_token_ids) or min(limits, default=1) < 1:
                raise ValueError(
                    f"max_new_tokens_per_prompt must hold one limit >= 1 per prompt "
                    f"({len(prompt_token_ids)}), got {list(max_new_tokens_per_prompt)[:8]}"
                )
        self.last_stats = stats = FastGenerationStats()
        if len(prompt_token_ids) == 0:
            return RolloutBatch(samples=[])
        prompts = [[int(t) for t in prompt] for prompt in prompt_token_ids]
        check_same_request(prompts, sampling, (self.tp_group,), self.device)
        samples = [
            _Sample(
                sample_id=p * sampling.n + j,
                prompt_index=p,
                sample_index=j,
                prompt=prompt,
                budget=min(limits[p], self.max_sequence_length - len(prompt)),
            )
            for p, prompt in enumerate(prompts)
            for j in range(sampling.n)
        ]
        # The last sampled token is never fed back: a sample needs len(prompt) + budget - 1 positions.
        slot_tokens = max(len(s.prompt) + s.budget - 1 for s in samples)
        cache = self._slots_for(len(samples), slot_tokens)
        stats.slots, stats.slot_tokens, stats.kv_cache_bytes = cache.num_slots, cache.slot_tokens, cache.nbytes
        if self._rope is None:  # the whole context once: captured graphs keep pointing at these tables
            self._rope = rope_tables(self.weights, self.max_sequence_length, self.device, self.dtype)
        stats.attention_backend, attention = "grouped, length buckets", grouped_decode_attention
        streams = None
        if self.is_sampler and not sampling.greedy:
            streams = UniformStreams([sample_seed(sampling.seed, s.prompt_index, s.sample_index) for s in samples])
        run = _Run(self, samples, sampling, streams, attention)
        with torch.inference_mode(), platform.device_rewrites_paused():
            run.until_done()
        self._share_logprobs(samples, sampling)
        stats.cuda_graphs = len(self._graphs)
        stats.samples = len(samples)
        batch = to_rollout_batch(samples, sampling)
        stats.generated_tokens = batch.num_tokens
        logger.info(
            "fast engine: %d samples, %d tokens in %.2f s (%.0f tokens/s; prefill %.2f s over %d prompts, "
            "%d decode steps); %d slots x %d tokens, occupancy %.0f%% while queued; truncated %.1f%%",
            stats.samples,
            stats.generated_tokens,
            stats.seconds,
            stats.tokens_per_second,
            stats.prefill_seconds,
            stats.prompt_prefills,
            stats.decode_steps,
            stats.slots,
            stats.slot_tokens,
            100 * stats.occupancy_while_queued,
            100 * batch.truncation_rate,
        )
        return batch

    # ------------------------------------------------------------------------------------------
    # Sampling and communication (called by _Run)

    def sample(
        self,
        logits: Optional[torch.Tensor],
        samples: list[_Sample],
        sampling: SamplingParams,
        streams: Optional[UniformStreams],
        pending: list,
    ) -> list[int]:
        """Sample the next token of `samples` from their logits ``[k, V_padded]`` on TP rank 0;
        returns the tokens on every rank and keeps the log-probs (device) in `pending`."""
        token_ids = None
        if self.is_sampler:
            uniforms = (
                torch.zeros(len(samples), dtype=torch.float64)
                if streams is None
                else streams.draw([s.sample_id for s in samples], [len(s.token_ids) for s in samples])
            )
            picked = sample_from_logits(logits, self.arch.vocab_size, sampling, uniforms)
            token_ids = picked.token_ids
            pending.append((samples, picked.sampler_logprobs, picked.logprobs))
        return self.broadcast_tokens(token_ids, len(samples))

    def broadcast_tokens(self, token_ids: Optional[torch.Tensor], count: int) -> list[int]:
        """TP rank 0's sampled ids ``[count]`` on every rank of the TP group, as a list."""
        if self.tp_group is not None:
            if not self.is_sampler:
                token_ids = torch.empty(count, dtype=torch.long, device=self.device)
            dist.broadcast(token_ids, src=self._sampler_rank, group=self.tp_group)
        return token_ids.tolist()

    def _share_logprobs(self, samples: list[_Sample], sampling: SamplingParams) -> None:
        """Broadcast the log-probs kept on TP rank 0 to the TP group, once per `generate`."""
        if self.tp_group is None:
            return
        if self.is_sampler:
            packed = pack_logprobs(samples, sampling.return_logprobs, self.device)
        else:
            total = sum(len(s.token_ids) for s in samples)  # known on every rank: tokens were broadcast
            packed = torch.empty((1 + sampling.return_logprobs, total), dtype=torch.float32, device=self.device)
        dist.broadcast(packed, src=self._sampler_rank, group=self.tp_group)
        if not self.is_sampler:
            unpack_logprobs(samples, packed)

    # ------------------------------------------------------------------------------------------
    # The decode step, eager or as a CUDA graph

    def decode_and_sample(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        kv_len: int,
        attention,
        sampling: SamplingParams,
        uniforms: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """One decode step over the first B slots and sampling of all B rows (TP=1, CUDA graphs).

        Returns ``token ids [B], sampler log-probs [B], log-probs [B] or None`` (device tensors,
        overwritten by the next call when replayed from a graph).
        """
        key = (tokens.shape[0], kv_len, sampling.temperature, sampling.top_k, sampling.top_p, sampling.return_logprobs)
        if key not in self._graphs:
            self._graphs[key] = self._capture(key, tokens, positions, kv_len, attention, sampling, uniforms)
        graph, static_in, static_out = self._graphs[key]
        for buffer, value in zip(static_in, (tokens, positions, uniforms)):
            buffer.copy_(value, non_blocking=True)
        graph.replay()
        return static_out

    def _capture(
        self,
        key: tuple,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        kv_len: int,
        attention,
        sampling: SamplingParams,
        uniforms: torch.Tensor,
    ) -> tuple:
        """Capture decode + sampling for one (batch bucket, key bucket, sampling) on static buffers."""
        static_in = (tokens.clone(), positions.clone(), uniforms.to(self.device, torch.float64).clone())
        cos, sin = self._rope

        def step() -> tuple:
            logits = decode_step(
                self.weights,
                self.cache.keys,
                self.cache.values,
                static_in[0],
                static_in[1],
                kv_len,
                cos,
                sin,
                attention,
            )
            picked = sample_from_logits(logits, self.arch.vocab_size, sampling, static_in[2])
            return picked.token_ids, picked.sampler_logprobs, picked.logprobs

        # Warm up on a side stream (allocator and kernel caches), then capture. Rewriting this step's
        # own keys and values at their positions is idempotent, so the warm-up changes nothing.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            static_out = step()
        logger.debug("captured a decode CUDA graph for %s", key)
        return graph, static_in, static_out
