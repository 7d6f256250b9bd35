"""One `FastRolloutEngine.generate` call's schedule: which sample holds which KV slot, when queued
samples are admitted and prefilled, the decode steps, and the slot bookkeeping around them."""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import TYPE_CHECKING, Callable, Optional

import torch

from megatron_gopd.rollout.base import SamplingParams
from megatron_gopd.rollout.fast_model import decode_step, prefill
from megatron_gopd.rollout.kv_slots import SlotAllocator
from megatron_gopd.rollout.sample_rows import (
    SampleRow,
    append_pending_logprobs,
    record_token,
)
from megatron_gopd.rollout.sampling import UniformStreams

_KV_LEN_BUCKET = {"cpu": 64, "cuda": 256}
"""Decode reads keys up to the longest live sample rounded up to this: fewer distinct shapes (and
CUDA graphs) for a few positions more read."""

if TYPE_CHECKING:
    from megatron_gopd.rollout.fast_engine import FastRolloutEngine


@dataclasses.dataclass
class _Sample(SampleRow):
    """One sample being generated, and the KV slot it holds."""

    slot: int = -1

    @property
    def next_position(self) -> int:
        """Position of the last sampled token, the one the next decode step feeds."""
        return len(self.prompt) + len(self.token_ids) - 1


class _Run:
    """One `generate` call's schedule: admission, prefill, decode steps and slot bookkeeping."""

    def __init__(
        self,
        engine: "FastRolloutEngine",
        samples: list[_Sample],
        sampling: SamplingParams,
        streams: Optional[UniformStreams],
        attention: Callable,
    ) -> None:
        self.engine, self.sampling, self.streams, self.attention = engine, sampling, streams, attention
        self.cache = engine.cache
        self.stats = engine.last_stats
        self.queue = collections.deque(samples)
        self.allocator = SlotAllocator(self.cache.num_slots)
        self.live: dict[int, _Sample] = {}  # slot -> sample
        self.unadmitted = collections.Counter(s.prompt_index for s in samples)
        self.prompt_logits: dict[int, torch.Tensor] = {}  # prompt -> [V_padded], until all its samples are in
        self.pending: list = []  # (samples, sampler log-probs, log-probs) per sampling call, on the device
        self.occupancy_queued: list[float] = []
        self.occupancy_all: list[float] = []

    def until_done(self) -> None:
        """Generate every sample to completion."""
        while self.queue or self.live:
            if self.queue and (self.engine.continuous_batching or not self.live):
                started = time.perf_counter()
                self._admit()
                self.stats.prefill_seconds += time.perf_counter() - started
            if self.live:
                started = time.perf_counter()
                self._decode()
                self.stats.decode_seconds += time.perf_counter() - started
        self._collect_logprobs()
        self.allocator.check()
        if self.allocator.num_live:
            raise RuntimeError(f"{self.allocator.num_live} KV slots still held after generate")
        self.stats.occupancy_while_queued = (
            sum(self.occupancy_queued) / len(self.occupancy_queued) if self.occupancy_queued else 1.0
        )
        self.stats.occupancy = sum(self.occupancy_all) / len(self.occupancy_all) if self.occupancy_all else 1.0

    # Admission -------------------------------------------------------------------------------

    def _donor(self, prompt_index: int) -> Optional[int]:
        """A live slot whose first positions hold this prompt's keys and values."""
        return next((slot for slot, s in self.live.items() if s.prompt_index == prompt_index), None)

    def _admit(self) -> None:
        """Fill free slots from the queue: prefill new prompts (under the token budget), copy shared ones."""
        admitted: list[_Sample] = []
        to_prefill: dict[int, _Sample] = {}  # prompt -> the admitted sample whose slot receives its prefill
        prefill_tokens = 0
        while self.queue and self.allocator.num_free:
            sample = self.queue[0]
            needs_prefill = (
                sample.prompt_index not in self.prompt_logits or self._donor(sample.prompt_index) is None
            ) and sample.prompt_index not in to_prefill
            if needs_prefill and to_prefill and prefill_tokens + len(sample.prompt) > self.engine.prefill_token_budget:
                break  # the rest waits for the next round; decoding goes on meanwhile
            self.queue.popleft()
            sample.slot = self.allocator.acquire(sample.sample_id)
            self.unadmitted[sample.prompt_index] -= 1
            if needs_prefill:
                to_prefill[sample.prompt_index] = sample
                prefill_tokens += len(sample.prompt)
            admitted.append(sample)
        if not admitted:
            return
        if to_prefill:
            self._prefill(list(to_prefill.values()))
        for sample in admitted:  # siblings: copy the prompt's KV from its prefilled or live slot
            source = to_prefill.get(sample.prompt_index)
            donor = source.slot if source is not None else self._donor(sample.prompt_index)
            if donor != sample.slot:
                self.cache.copy_prefix(donor, [sample.slot], len(sample.prompt))
            self.live[sample.slot] = sample
        logits = torch.stack([self.prompt_logits[s.prompt_index] for s in admitted]) if self.engine.is_sampler else None
        for prompt_index in {s.prompt_index for s in admitted}:
            if self.unadmitted[prompt_index] == 0:
                del self.prompt_logits[prompt_index]
        tokens = self.engine.sample(logits, admitted, self.sampling, self.streams, self.pending)
        self._record_and_free(admitted, tokens)

    def _prefill(self, firsts: list[_Sample]) -> None:
        """Packed prefill of these samples' prompts into their slots; keeps each prompt's last logits."""
        engine = self.engine
        cu_seqlens = [0]
        for sample in firsts:
            cu_seqlens.append(cu_seqlens[-1] + len(sample.prompt))
        tokens = torch.tensor([t for s in firsts for t in s.prompt], dtype=torch.long, device=engine.device)  # [T]
        positions = torch.cat([torch.arange(len(s.prompt), device=engine.device) for s in firsts])  # [T]
        cos, sin = engine._rope
        logits = prefill(
            engine.weights, self.cache, tokens, positions, cu_seqlens, [s.slot for s in firsts], cos, sin
        )  # [P, V_padded]
        for row, sample in enumerate(firsts):
            self.prompt_logits[sample.prompt_index] = logits[row]
        self.stats.prompt_prefills += len(firsts)
        self.stats.prefill_tokens += cu_seqlens[-1]

    # Decoding --------------------------------------------------------------------------------

    def _decode(self) -> None:
        """One token for every live sample."""
        started = time.perf_counter()
        engine = self.engine
        self._compact_if_sparse()
        high = self.allocator.high_water
        batch = min(self.cache.num_slots, 1 << (high - 1).bit_length())  # power-of-two bucket
        slots = sorted(self.live)
        samples = [self.live[slot] for slot in slots]
        tokens = torch.zeros(batch, dtype=torch.long)
        positions = torch.zeros(batch, dtype=torch.long)  # free rows write position 0 of their own free slot
        for slot, sample in zip(slots, samples):
            tokens[slot], positions[slot] = sample.token_ids[-1], sample.next_position
        longest, bucket = max(s.next_position for s in samples) + 1, _KV_LEN_BUCKET[engine.device.type]
        kv_len = min(self.cache.slot_tokens, -(-longest // bucket) * bucket)
        occupancy = len(samples) / self.cache.num_slots
        self.occupancy_all.append(occupancy)
        if self.queue:
            self.occupancy_queued.append(occupancy)
        tokens, positions = tokens.to(engine.device), positions.to(engine.device)
        if engine.use_cuda_graphs:
            uniforms = torch.zeros(batch, dtype=torch.float64)
            if self.streams is not None:
                uniforms[slots] = self.streams.draw([s.sample_id for s in samples], [len(s.token_ids) for s in samples])
            token_ids, sampler_lp, lp = engine.decode_and_sample(
                tokens, positions, kv_len, self.attention, self.sampling, uniforms
            )
            rows = torch.tensor(slots, device=engine.device)
            self.pending.append((samples, sampler_lp[rows], None if lp is None else lp[rows]))
            self.stats.decode_host_seconds += time.perf_counter() - started
            sampled = token_ids[rows].tolist()  # waits for the device
        else:
            cos, sin = engine._rope
            logits = decode_step(
                engine.weights, self.cache.keys, self.cache.values, tokens, positions, kv_len, cos, sin, self.attention
            )  # [B, V_padded]
            if len(slots) < batch:
                logits = logits[torch.tensor(slots, device=engine.device)]
            sampled = engine.sample(
                logits if engine.is_sampler else None, samples, self.sampling, self.streams, self.pending
            )
        self.stats.decode_steps += 1
        self._record_and_free(samples, sampled)

    def _compact_if_sparse(self) -> None:
        """Once the queue is empty, move live samples down so the decode bucket can shrink."""
        if self.queue:
            return
        live = self.allocator.num_live
        if 1 << max(live - 1, 0).bit_length() >= self.allocator.high_water:
            return  # already within the smallest bucket that holds them
        for sample_id, to_slot in self.allocator.compaction_moves():
            from_slot = self.allocator.move(sample_id, to_slot)
            sample = self.live.pop(from_slot)
            self.cache.move(from_slot, to_slot, sample.next_position)  # positions written so far
            sample.slot = to_slot
            self.live[to_slot] = sample

    def _record_and_free(self, samples: list[_Sample], tokens: list[int]) -> None:
        """Record sampled tokens; finished samples give their slots back at once."""
        for sample, token in zip(samples, tokens):
            record_token(sample, token, self.engine.eos_token_ids, self.sampling)
            if sample.finish_reason is not None:
                del self.live[sample.slot]
                self.allocator.release(sample.sample_id)

    def _collect_logprobs(self) -> None:
        """Append the log-probs kept on the device to their samples (TP rank 0), in token order."""
        pending, self.pending = self.pending, []
        if self.engine.is_sampler:
            append_pending_logprobs(pending)
