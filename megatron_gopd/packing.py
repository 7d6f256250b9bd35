"""Packed variable-length micro-batches: many sequences laid end to end in one ``[1, t]`` row.

Right-padding a micro-batch to its longest sequence wastes the padding's compute and, with
attention that materialises scores, its memory; packing wastes neither. The model reads a packed
row through Megatron's `PackedSeqParams` (``qkv_format="thd"``): the attention (`SDPAttention` or
Transformer Engine's) keeps each sequence to itself, and megatron-core's rotary embedding restarts
its positions at every sequence start (it indexes the RoPE table per ``cu_seqlens`` segment), so a
packed sequence gets exactly the numbers it would get alone.

    batch = pack_sequences([[5, 6, 7], [8, 9]], pad_to_multiple_of=tp)
    output = model(batch.tokens, batch.position_ids, None, packed_seq_params=batch.packed_seq_params)
    per_sequence = batch.unpack(output, dim=1)   # logits [1, t, V] -> [[1, 3, V], [1, 2, V]]
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional, Sequence

import torch

PackingMode = Literal["auto", "on", "off"]
"""``auto``: pack every model whose attention can take packed sequences; ``on``: require it;
``off``: right-padded ``[b, s]`` micro-batches."""


@dataclasses.dataclass
class PackedBatch:
    """One packed micro-batch and what the model needs to read it."""

    tokens: torch.Tensor
    """``[1, t]`` token ids: the sequences end to end, then the padding (if any)."""
    position_ids: torch.Tensor
    """``[1, t]`` positions, restarting at 0 for every sequence (and for the padding)."""
    packed_seq_params: object
    """Megatron `PackedSeqParams` (``thd``): ``cu_seqlens_q`` / ``cu_seqlens_kv`` int32
    ``[n + 1]`` (``[n + 2]`` with padding, which is packed as a sequence of its own) and the
    longest segment's length."""
    lengths: list[int]
    """Length of every input sequence, in input order (the padding excluded)."""

    @property
    def num_padding(self) -> int:
        """Padding tokens after the last sequence."""
        return self.tokens.shape[1] - sum(self.lengths)

    def unpack(self, values: torch.Tensor, dim: int = 1) -> list[torch.Tensor]:
        """Split `values` along its token dimension `dim` into one view per input sequence.

        `dim` is 1 for batch-first model outputs (logits ``[1, t, V]``) and 0 for Megatron's
        sequence-first tensors (hidden states ``[t, 1, h]``); the padding is dropped.
        """
        if values.shape[dim] != self.tokens.shape[1]:
            raise ValueError(
                f"values have {values.shape[dim]} positions along dim {dim}, the packed batch {self.tokens.shape[1]}"
            )
        pieces = torch.split(values, self.lengths + [self.num_padding], dim=dim)
        return list(pieces[: len(self.lengths)])

    @property
    def offsets(self) -> list[int]:
        """Where each sequence starts in the packed row."""
        return self.packed_seq_params.cu_seqlens_q[: len(self.lengths)].tolist()

    def padded_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, columns) ``[n]`` int64, n = sum(lengths): where each real packed token sits when
        the same sequences are right-padded to ``[len(lengths), max(lengths)]`` rows."""
        device = self.tokens.device
        lengths = torch.tensor(self.lengths, device=device)
        rows = torch.repeat_interleave(torch.arange(len(self.lengths), device=device), lengths)
        columns = self.position_ids[0, : rows.numel()]  # positions restart at 0 per sequence
        return rows, columns

    def gather_padded(self, values: torch.Tensor, fill: float = 0) -> torch.Tensor:
        """``[b, s, ...]`` right-padded values (row i: sequence i) -> ``[1, t, ...]`` packed like
        the tokens; the padding segment gets `fill`."""
        rows, columns = self.padded_index()
        real = values[rows, columns]  # [n, ...]
        padding = real.new_full((self.num_padding,) + tuple(real.shape[1:]), fill)
        return torch.cat([real, padding]).unsqueeze(0)

    def scatter_padded(self, values: torch.Tensor, length: int, fill: float = 0) -> torch.Tensor:
        """``[1, t, ...]`` packed values -> ``[len(lengths), length, ...]`` right-padded rows,
        `fill` past each sequence's end; differentiable in `values` (the inverse of `gather_padded`)."""
        rows, columns = self.padded_index()
        shape = (len(self.lengths), length) + tuple(values.shape[2:])
        out = values.new_full(shape, fill)
        return out.index_put((rows, columns), values[0, : rows.numel()])


def pack_sequences(
    sequences: Sequence[Sequence[int]],
    *,
    pad_to_multiple_of: int = 1,
    pad_id: int = 0,
    device: Optional[torch.device] = None,
) -> PackedBatch:
    """Pack token sequences into one ``[1, t]`` row with Megatron `PackedSeqParams`.

    `pad_to_multiple_of` rounds ``t`` up (sequence parallelism splits the packed row over the TP
    ranks, so it needs ``t % tp == 0``); the padding tokens (`pad_id`) form a last sequence of
    their own, so they attend only to each other and never change a real token's result.
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    if len(sequences) == 0:
        raise ValueError("pack_sequences needs at least one sequence")
    lengths = [len(seq) for seq in sequences]
    empty = [i for i, length in enumerate(lengths) if length == 0]
    if empty:
        raise ValueError(f"pack_sequences: sequences {empty} are empty")
    total = sum(lengths)
    padding = -total % pad_to_multiple_of
    segments = lengths + ([padding] if padding else [])

    flat = [token for seq in sequences for token in seq] + [pad_id] * padding
    tokens = torch.tensor(flat, dtype=torch.long, device=device).unsqueeze(0)  # [1, t]
    positions = torch.cat([torch.arange(n, device=device) for n in segments]).unsqueeze(0)  # [1, t]
    cu_seqlens = torch.zeros(len(segments) + 1, dtype=torch.int32, device=device)
    cu_seqlens[1:] = torch.cumsum(torch.tensor(segments, device=device), 0)
    longest = max(segments)
    params = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens, max_seqlen_q=longest, max_seqlen_kv=longest
    )
    return PackedBatch(tokens=tokens, position_ids=positions, packed_seq_params=params, lengths=lengths)


def packing_enabled(mode: PackingMode, attention: str, model: str) -> bool:
    """Whether `model` (a label naming it in errors) runs packed micro-batches under `mode`.

    Every core attention but megatron-core's local one (``attention='local'``) takes packed
    sequences. ``mode='on'`` with local attention is refused (ValueError naming both settings).
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"packing must be 'auto', 'on' or 'off', got {mode!r}")
    if mode == "off":
        return False
    if attention == "local":
        if mode == "on":
            raise ValueError(
                f"packing=on, but {model} has attention='local' (megatron-core's DotProductAttention, "
                "which cannot take packed sequences): set its attention to 'auto' or 'sdpa', or "
                "packing to 'auto' (pack the models that can) or 'off'"
            )
        return False
    return True
