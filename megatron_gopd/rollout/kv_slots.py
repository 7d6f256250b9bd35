"""KV slots for continuous batching: how many fit in a memory budget, who holds which, and the buffers.

A slot holds one sample's keys (already rotated) and values for every layer, up to the longest
prompt + response of the request. A finished sample gives its slot back at once and a queued one
takes it, so the number of slots is set by memory, never by batch x max_new_tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

GB = 1e9
"""``kv_cache_gb`` counts decimal gigabytes (every engine and the memory plan)."""

DEFAULT_CPU_KV_CACHE_GB = 1.0
"""KV-cache size per rank on CPU when ``rollout.kv_cache_gb`` is unset (every engine: CPU engines do
not size their cache from free memory; vLLM's own CPU default is 4 GB)."""


@dataclasses.dataclass(frozen=True)
class KVSlotShape:
    """What one slot stores, on one rank."""

    num_layers: int
    kv_heads: int
    """Key/value heads on this rank (the query groups divided by TP)."""
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def for_model(cls, arch, tensor_parallel: int, dtype: torch.dtype) -> "KVSlotShape":
        """The slot shape of a `ModelArchitecture` on one rank of a TP group (config checks use this
        to print the slot count a budget gives before any model is built)."""
        return cls(arch.num_layers, arch.num_query_groups // tensor_parallel, arch.kv_channels, dtype)

    def bytes_per_token(self) -> int:
        """Keys plus values of one token over all layers."""
        return 2 * self.num_layers * self.kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def bytes_per_slot(self, slot_tokens: int) -> int:
        """One slot of `slot_tokens` positions."""
        return self.bytes_per_token() * slot_tokens


def slots_for_budget(shape: KVSlotShape, slot_tokens: int, budget_bytes: float, *, what: str = "kv_cache_gb") -> int:
    """How many slots of `slot_tokens` positions fit in `budget_bytes`; ValueError when not one does.

    `what` names the setting the budget came from, for the error message.
    """
    if slot_tokens < 1:
        raise ValueError(f"a KV slot needs at least one position, got slot_tokens={slot_tokens}")
    per_slot = shape.bytes_per_slot(slot_tokens)
    slots = int(budget_bytes // per_slot)
    if slots < 1:
        element = torch.empty((), dtype=shape.dtype).element_size()
        raise ValueError(
            f"{what}: a KV budget of {budget_bytes / GB:.4g} GB holds no sample of {slot_tokens} tokens "
            f"(one needs {per_slot / GB:.4g} GB: {shape.num_layers} layers x 2 x {shape.kv_heads} KV heads x "
            f"{shape.head_dim} x {slot_tokens} tokens x {element} bytes); raise the budget or shorten "
            "max_sequence_length"
        )
    return slots


class SlotAllocator:
    """Which sample holds which slot; pure Python, with its invariants checked on every call.

    `acquire` hands out the lowest free slot, so that live samples crowd the low slot indices and
    the decode step can run over a short prefix ``[0, high_water)`` of the slots.
    """

    def __init__(self, num_slots: int) -> None:
        if not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(f"the KV cache needs at least one slot, got {num_slots!r}")
        self.num_slots = num_slots
        self.owner: list[Optional[int]] = [None] * num_slots
        """``owner[slot]``: the sample id holding the slot, or None when free."""
        self.slot_of: dict[int, int] = {}
        """Sample id -> its slot, for the live samples."""

    @property
    def num_free(self) -> int:
        """Free slots."""
        return self.num_slots - len(self.slot_of)

    @property
    def num_live(self) -> int:
        """Slots in use."""
        return len(self.slot_of)

    @property
    def high_water(self) -> int:
        """One past the highest slot in use (0 when all are free)."""
        for slot in range(self.num_slots - 1, -1, -1):
            if self.owner[slot] is not None:
                return slot + 1
        return 0

    def acquire(self, sample_id: int) -> int:
        """Give `sample_id` the lowest free slot; RuntimeError when it already has one or none is free."""
        if sample_id in self.slot_of:
            raise RuntimeError(f"sample {sample_id} already holds slot {self.slot_of[sample_id]}")
        for slot, owner in enumerate(self.owner):
            if owner is None:
                self.owner[slot] = sample_id
                self.slot_of[sample_id] = slot
                return slot
        raise RuntimeError("no free KV slot")

    def release(self, sample_id: int) -> int:
        """Free the slot of `sample_id`; returns it."""
        slot = self.slot_of.pop(sample_id)
        if self.owner[slot] != sample_id:
            raise RuntimeError(f"slot {slot} is held by {self.owner[slot]}, not by sample {sample_id}")
        self.owner[slot] = None
        return slot

    def move(self, sample_id: int, to_slot: int) -> int:
        """Hand `sample_id` the free slot `to_slot` (compaction); returns the slot it left."""
        if self.owner[to_slot] is not None:
            raise RuntimeError(f"slot {to_slot} is not free (held by {self.owner[to_slot]})")
        from_slot = self.slot_of[sample_id]
        self.owner[from_slot], self.owner[to_slot] = None, sample_id
        self.slot_of[sample_id] = to_slot
        return from_slot

    def compaction_moves(self) -> list[tuple[int, int]]:
        """``(sample_id, free slot)`` pairs that pack the live samples into ``[0, num_live)``."""
        free_low = [s for s in range(self.num_live) if self.owner[s] is None]
        high = [self.owner[s] for s in range(self.num_slots - 1, self.num_live - 1, -1) if self.owner[s] is not None]
        return list(zip(high, free_low))

    def check(self) -> None:
        """Assert the bookkeeping invariants: no slot used twice, both maps agree."""
        held = [o for o in self.owner if o is not None]
        if len(held) != len(set(held)):
            raise AssertionError(f"a sample holds two slots: {self.owner}")
        if {o: s for s, o in enumerate(self.owner) if o is not None} != self.slot_of:
            raise AssertionError(f"slot maps disagree: {self.owner} vs {self.slot_of}")


class KVSlots:
    """The preallocated key and value buffers: per layer ``[slots, kv_heads, slot_tokens, head_dim]``.

    Keys are stored after RoPE, at their true positions, so that no step ever rotates them again.
    Heads-major, so that the first positions of a run of slots are a view attention reads in place.
    """

    def __init__(self, shape: KVSlotShape, num_slots: int, slot_tokens: int, device: torch.device) -> None:
        self.shape, self.num_slots, self.slot_tokens = shape, num_slots, slot_tokens
        size = (num_slots, shape.kv_heads, slot_tokens, shape.head_dim)
        self.keys = [torch.zeros(size, dtype=shape.dtype, device=device) for _ in range(shape.num_layers)]
        self.values = [torch.zeros(size, dtype=shape.dtype, device=device) for _ in range(shape.num_layers)]

    def fits(self, num_slots: int, slot_tokens: int) -> bool:
        """Whether these buffers can serve a request needing that many slots of that length."""
        return self.num_slots >= num_slots and self.slot_tokens >= slot_tokens

    def copy_prefix(self, from_slot: int, to_slots: list[int], length: int) -> None:
        """Copy positions ``[0, length)`` of one slot into others (a prompt shared by its samples)."""
        if not to_slots:
            return
        index = torch.tensor(to_slots, device=self.keys[0].device)
        for buffers in (self.keys, self.values):
            for layer in buffers:
                layer[index, :, :length] = layer[from_slot, :, :length]  # [n, kv, length, d] <- broadcast

    def move(self, from_slot: int, to_slot: int, length: int) -> None:
        """Move a live sample's first `length` positions to another slot (compaction)."""
        self.copy_prefix(from_slot, [to_slot], length)

    @property
    def nbytes(self) -> int:
        """Bytes held by all buffers."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
