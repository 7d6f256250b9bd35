"""One functional forward of a dense Megatron GPTModel (local spec) over the student's own parameters.

`DecoderWeights` holds the model's `Parameter` objects themselves (no copy): an optimizer step, an
in-place update or a re-pointed ``param.data`` is seen by the next forward with no sync call.

The math is Megatron's local-spec layer, written out once for two shapes of input:

* `prefill`: whole prompts packed one after another (``[T]`` tokens at their true positions); keys
  are rotated once and written, with the values, into each prompt's KV slot.
* `decode_step`: one token for each of the first B slots; it writes its key / value into the slot at
  the token's position and attends over the slot's first ``kv_len`` positions. Static shapes, no
  host synchronisation, writes only into the preallocated slots: it traces with
  ``torch.compile(fullgraph=True)`` and captures into a CUDA graph.

Tensor parallelism runs on Megatron's own TP shards in place, as its layers do: the embedding is
vocab-parallel (masked lookup, all-reduce), QKV and fc1 are column-parallel (each rank holds its
query groups and its half of gate / up), the attention and MLP outputs are row-parallel
(all-reduce), and the output layer's vocab-parallel logits are all-gathered.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_gopd.rollout.fast_attention import DecodeAttention, packed_prefill_attention
from megatron_gopd.rollout.kv_slots import KVSlots


@dataclasses.dataclass
class LayerWeights:
    """One transformer layer's parameters (Megatron's own `Parameter` objects) and norm epsilons."""

    input_norm: torch.Tensor
    """``[H]`` RMSNorm weight before attention."""
    qkv: torch.Tensor
    """``[G * (rep + 2) * d, H]``: per local query group, its rep query heads, its key, its value."""
    q_norm: Optional[torch.Tensor]
    """``[d]`` per-head query RMSNorm weight (Qwen3), or None."""
    k_norm: Optional[torch.Tensor]
    proj: torch.Tensor
    """``[H, Hq * d]`` attention output projection (row-parallel)."""
    pre_mlp_norm: torch.Tensor
    fc1: torch.Tensor
    """``[2 F, H]``: gate rows, then up rows (this rank's halves)."""
    fc2: torch.Tensor
    """``[H, F]`` (row-parallel)."""
    norm_eps: float
    qk_norm_eps: float


@dataclasses.dataclass
class DecoderWeights:
    """Everything the functional forward reads, on one TP rank."""

    embedding: torch.Tensor
    """``[V_padded / tp, H]`` this rank's rows of the word embedding."""
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    final_norm_eps: float
    output: torch.Tensor
    """``[V_padded / tp, H]`` the output layer (the embedding itself when tied)."""
    inv_freq: torch.Tensor
    """``[d / 2]`` RoPE inverse frequencies, as Megatron's rotary embedding holds them (scaling applied)."""
    heads: int
    """Query heads on this rank."""
    groups: int
    """Key/value heads on this rank."""
    head_dim: int
    tp_group: Optional[dist.ProcessGroup]
    """The TP group, or None at TP=1 (no collectives)."""
    vocab_start: int
    """First vocabulary row this rank holds."""

    @property
    def tp_size(self) -> int:
        return 1 if self.tp_group is None else self.tp_group.size()

    @property
    def softmax_scale(self) -> float:
        return self.head_dim**-0.5


def _norm_eps(module) -> float:
    eps = getattr(module, "eps", None)
    if eps is None:
        raise TypeError(f"{type(module).__name__} has no eps: not an RMSNorm of Megatron's local spec")
    return float(eps)


def decoder_weights(model) -> DecoderWeights:
    """Point at the parameters of a (possibly DDP-wrapped) dense local-spec GPTModel; nothing is copied.

    The caller checks support first (`fast_engine_unsupported_reason`).
    """
    from megatron.core.utils import get_attr_wrapped_model

    gpt = get_attr_wrapped_model(model, "decoder", return_model_obj=True)
    config = gpt.config
    tp_group = gpt.pg_collection.tp
    tp = tp_group.size()
    layers = []
    for layer in gpt.decoder.layers:
        attention = layer.self_attention
        qk_norm = config.qk_layernorm  # without it Megatron puts identity modules (or None) there
        layers.append(
            LayerWeights(
                input_norm=layer.input_layernorm.weight,
                qkv=attention.linear_qkv.weight,
                q_norm=attention.q_layernorm.weight if qk_norm else None,
                k_norm=attention.k_layernorm.weight if qk_norm else None,
                proj=attention.linear_proj.weight,
                pre_mlp_norm=layer.pre_mlp_layernorm.weight,
                fc1=layer.mlp.linear_fc1.weight,
                fc2=layer.mlp.linear_fc2.weight,
                norm_eps=_norm_eps(layer.input_layernorm),
                qk_norm_eps=_norm_eps(attention.q_layernorm) if qk_norm else 0.0,
            )
        )
    embedding = gpt.embedding.word_embeddings
    return DecoderWeights(
        embedding=embedding.weight,
        layers=layers,
        final_norm=gpt.decoder.final_layernorm.weight,
        final_norm_eps=_norm_eps(gpt.decoder.final_layernorm),
        output=gpt.shared_embedding_or_output_weight()
        if gpt.share_embeddings_and_output_weights
        else gpt.output_layer.weight,
        inv_freq=gpt.rotary_pos_emb.inv_freq,
        heads=config.num_attention_heads // tp,
        groups=config.num_query_groups // tp,
        head_dim=config.kv_channels,
        tp_group=tp_group if tp > 1 else None,
        vocab_start=embedding.vocab_start_index,
    )


def rope_tables(
    weights: DecoderWeights, positions: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin [positions, d]`` as Megatron computes them (fp32 angles, then cast to `dtype`)."""
    inv_freq = weights.inv_freq.to(device=device, dtype=torch.float32)
    angles = torch.outer(torch.arange(positions, device=device, dtype=torch.float32), inv_freq)  # [P, d/2]
    angles = torch.cat((angles, angles), dim=-1)  # [P, d]: Megatron's non-interleaved layout
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``x [T, heads, d]`` with ``cos / sin [T, d]`` (rotate-half, as Megatron's bshd path)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos[:, None, :] + torch.cat((-second, first), dim=-1) * sin[:, None, :]


def _all_reduce(x: torch.Tensor, weights: DecoderWeights) -> torch.Tensor:
    if weights.tp_group is not None:
        dist.all_reduce(x, group=weights.tp_group)
    return x


def _embed(weights: DecoderWeights, tokens: torch.Tensor) -> torch.Tensor:
    """``tokens [T] -> [T, H]`` (vocab-parallel lookup under TP, as `VocabParallelEmbedding`)."""
    if weights.tp_group is None:
        return F.embedding(tokens, weights.embedding)
    rows = weights.embedding.shape[0]
    outside = (tokens < weights.vocab_start) | (tokens >= weights.vocab_start + rows)
    local = (tokens - weights.vocab_start).masked_fill(outside, 0)
    hidden = F.embedding(local, weights.embedding).masked_fill(outside[:, None], 0.0)
    return _all_reduce(hidden, weights)


def _qkv(
    weights: DecoderWeights, layer: LayerWeights, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [T, H]`` -> rotated ``q [T, Hq, d]``, rotated ``k [T, G, d]``, ``v [T, G, d]``."""
    tokens, groups, dim = x.shape[0], weights.groups, weights.head_dim
    rep = weights.heads // groups
    mixed = F.linear(x, layer.qkv).view(tokens, groups, (rep + 2) * dim)  # [T, G, (rep + 2) d]
    q, k, v = torch.split(mixed, [rep * dim, dim, dim], dim=-1)
    q = q.reshape(tokens, weights.heads, dim)  # [T, Hq, d]: a group's query heads are adjacent
    if layer.q_norm is not None:
        q = F.rms_norm(q, (dim,), layer.q_norm, layer.qk_norm_eps)
        k = F.rms_norm(k, (dim,), layer.k_norm, layer.qk_norm_eps)
    return _rotate(q, cos, sin), _rotate(k, cos, sin), v


def _mlp(weights: DecoderWeights, layer: LayerWeights, hidden: torch.Tensor) -> torch.Tensor:
    """SwiGLU MLP (row-parallel output all-reduced): ``[T, H] -> [T, H]``."""
    x = F.rms_norm(hidden, (hidden.shape[-1],), layer.pre_mlp_norm, layer.norm_eps)
    gate, up = F.linear(x, layer.fc1).chunk(2, dim=-1)  # [T, F] each
    return _all_reduce(F.linear(F.silu(gate) * up, layer.fc2), weights)


def logits_of(weights: DecoderWeights, hidden: torch.Tensor) -> torch.Tensor:
    """``hidden [T, H]`` -> full padded-vocabulary logits ``[T, V_padded]`` (gathered over TP)."""
    x = F.rms_norm(hidden, (hidden.shape[-1],), weights.final_norm, weights.final_norm_eps)
    local = F.linear(x, weights.output)  # [T, V_padded / tp]
    if weights.tp_group is None:
        return local
    parts = [torch.empty_like(local) for _ in range(weights.tp_size)]
    dist.all_gather(parts, local.contiguous(), group=weights.tp_group)
    return torch.cat(parts, dim=-1)


def prefill(
    weights: DecoderWeights,
    cache: KVSlots,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    cu_seqlens: list[int],
    slots: list[int],
    cos: torch.Tensor,
    sin: torch.Tensor,
    logit_rows: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Run packed whole prompts; write their rotated keys and values into `slots`; return logits.

    Args:
        tokens: ``[T]`` the prompts one after another; positions ``[T]`` each token's position.
        cu_seqlens: ``P + 1`` offsets: prompt p is ``tokens[cu_seqlens[p]:cu_seqlens[p + 1]]``.
        slots: the KV slot of each prompt (``P``).
        cos, sin: `rope_tables` covering every position.
        logit_rows: ``[R]`` rows of the packed input to return logits for; default each prompt's last.

    Returns:
        ``[R, V_padded]`` logits.
    """
    hidden = _embed(weights, tokens)  # [T, H]
    cos, sin = cos[positions], sin[positions]  # [T, d]
    # Token t of the packed input lands at (its prompt's slot, its position).
    slot_of_token = torch.repeat_interleave(
        torch.tensor(slots, device=tokens.device),
        torch.tensor([b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])], device=tokens.device),
    )  # [T]
    for index, layer in enumerate(weights.layers):
        x = F.rms_norm(hidden, (hidden.shape[-1],), layer.input_norm, layer.norm_eps)
        q, k, v = _qkv(weights, layer, x, cos, sin)
        cache.keys[index][slot_of_token, :, positions] = k  # [T, G, d] into [slots, G, slot_tokens, d]
        cache.values[index][slot_of_token, :, positions] = v
        attended = packed_prefill_attention(q, k, v, cu_seqlens, weights.softmax_scale)  # [T, Hq, d]
        hidden = hidden + _all_reduce(F.linear(attended.flatten(1), layer.proj), weights)
        hidden = hidden + _mlp(weights, layer, hidden)
    if logit_rows is None:
        logit_rows = torch.tensor(cu_seqlens[1:], device=tokens.device) - 1
    return logits_of(weights, hidden[logit_rows])


def decode_step(
    weights: DecoderWeights,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    tokens: torch.Tensor,
    positions: torch.Tensor,
    kv_len: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    attention: DecodeAttention,
) -> torch.Tensor:
    """One token for each of the first B slots: ``tokens / positions [B] -> logits [B, V_padded]``.

    `keys` / `values` are the per-layer slot buffers ``[slots, G, slot_tokens, d]``; row b of the
    input belongs to slot b. Each token's key and value are written at its position, then it attends
    over its slot's positions ``[0, position]`` (read within the first `kv_len`, a static bucket).
    """
    batch = tokens.shape[0]
    rows = torch.arange(batch, device=tokens.device)
    lengths = positions + 1  # [B] keys each sample attends over, its new one included
    hidden = _embed(weights, tokens)  # [B, H]
    cos, sin = cos[positions], sin[positions]  # [B, d]
    for index, layer in enumerate(weights.layers):
        x = F.rms_norm(hidden, (hidden.shape[-1],), layer.input_norm, layer.norm_eps)
        q, k, v = _qkv(weights, layer, x, cos, sin)  # [B, Hq, d], [B, G, d], [B, G, d]
        layer_keys, layer_values = keys[index], values[index]
        layer_keys[rows, :, positions] = k  # in place, at (slot b, position of b)
        layer_values[rows, :, positions] = v
        attended = attention(
            q, layer_keys[:batch, :, :kv_len], layer_values[:batch, :, :kv_len], lengths, weights.softmax_scale
        )  # [B, Hq, d]
        hidden = hidden + _all_reduce(F.linear(attended.flatten(1), layer.proj), weights)
        hidden = hidden + _mlp(weights, layer, hidden)
    return logits_of(weights, hidden)
