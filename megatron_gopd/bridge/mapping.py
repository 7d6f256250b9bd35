"""Which Hugging Face tensors make up each Megatron parameter, and how they are split over ranks.

One table for the three supported families (Qwen3, Qwen3-MoE, Llama 3 share HF naming; Qwen3 adds
q/k norms, Qwen3-MoE swaps the MLP for a router and experts). Megatron names are written in their
*canonical* form: the local (non-TE) spec's names with global layer and expert numbers.
`canonical_name` turns a rank's own parameter name (local layer / expert numbers, TE spec names)
into that form.

Split kinds (TP rank r of T; ``n`` = the dimension being split):

- ``replicated``: the same full tensor on every rank (norms, router).
- ``vocab``: rows ``[r*Vp/T, (r+1)*Vp/T)`` of the vocabulary padded to Vp; padding rows are zero.
- ``column`` / ``row``: dim 0 / dim 1 cut into T contiguous blocks (``linear_proj``, ``linear_fc2``).
- ``qkv``: Megatron's fused ``linear_qkv`` in grouped layout: for each query group of the rank's
  block of groups, the group's query heads, then its key head, then its value head.
- ``gate_up``: ``linear_fc1`` of a SwiGLU MLP: the rank's block of ``gate_proj`` rows followed by the
  same block of ``up_proj`` rows.

Expert parameters are split over expert-tensor-parallel ranks instead of TP, and each expert-parallel
rank holds experts ``[e*E/EP, (e+1)*E/EP)`` numbered locally from 0.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

import torch

from megatron_gopd.models.architecture import ModelArchitecture

SplitKind = Literal["replicated", "vocab", "column", "row", "qkv", "gate_up"]


@dataclasses.dataclass(frozen=True)
class ParamMapping:
    """One Megatron parameter (canonical name) and the HF tensors it is made of."""

    megatron: str
    hf: tuple[str, ...]
    kind: SplitKind
    expert: bool = False
    """Split over expert-tensor-parallel ranks (and distributed over expert-parallel ranks)."""


def _layer(arch: ModelArchitecture, i: int) -> list[ParamMapping]:
    mg, hf = f"decoder.layers.{i}", f"model.layers.{i}"
    out = [
        ParamMapping(f"{mg}.input_layernorm.weight", (f"{hf}.input_layernorm.weight",), "replicated"),
        ParamMapping(
            f"{mg}.self_attention.linear_qkv.weight", tuple(f"{hf}.self_attn.{p}_proj.weight" for p in "qkv"), "qkv"
        ),
        ParamMapping(f"{mg}.self_attention.linear_proj.weight", (f"{hf}.self_attn.o_proj.weight",), "row"),
        ParamMapping(f"{mg}.pre_mlp_layernorm.weight", (f"{hf}.post_attention_layernorm.weight",), "replicated"),
    ]
    if arch.qk_layernorm:
        out += [
            ParamMapping(f"{mg}.self_attention.q_layernorm.weight", (f"{hf}.self_attn.q_norm.weight",), "replicated"),
            ParamMapping(f"{mg}.self_attention.k_layernorm.weight", (f"{hf}.self_attn.k_norm.weight",), "replicated"),
        ]
    if not arch.is_moe:
        out += [
            ParamMapping(
                f"{mg}.mlp.linear_fc1.weight", (f"{hf}.mlp.gate_proj.weight", f"{hf}.mlp.up_proj.weight"), "gate_up"
            ),
            ParamMapping(f"{mg}.mlp.linear_fc2.weight", (f"{hf}.mlp.down_proj.weight",), "row"),
        ]
        return out
    out.append(ParamMapping(f"{mg}.mlp.router.weight", (f"{hf}.mlp.gate.weight",), "replicated"))
    for e in range(arch.num_experts):
        expert_mg, expert_hf = f"{mg}.mlp.experts.local_experts.{e}", f"{hf}.mlp.experts.{e}"
        out += [
            ParamMapping(
                f"{expert_mg}.linear_fc1.weight",
                (f"{expert_hf}.gate_proj.weight", f"{expert_hf}.up_proj.weight"),
                "gate_up",
                expert=True,
            ),
            ParamMapping(f"{expert_mg}.linear_fc2.weight", (f"{expert_hf}.down_proj.weight",), "row", expert=True),
        ]
    return out


def param_mappings(arch: ModelArchitecture) -> list[ParamMapping]:
    """Every parameter of the full model, in HF order (embeddings, layers, final norm, head)."""
    out = [ParamMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab")]
    for i in range(arch.num_layers):
        out += _layer(arch, i)
    out.append(ParamMapping("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated"))
    # A tied head is the embedding; on the last pipeline stage Megatron keeps a copy of it that is
    # loaded from the embedding and never exported.
    head_source = "model.embed_tokens.weight" if arch.tie_word_embeddings else "lm_head.weight"
    out.append(ParamMapping("output_layer.weight", (head_source,), "vocab"))
    return out


def hf_shapes(arch: ModelArchitecture) -> dict[str, tuple[int, ...]]:
    """The full shape of every HF tensor of `arch` (what an export yields)."""
    h, d = arch.hidden_size, arch.kv_channels
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (arch.vocab_size, h), "model.norm.weight": (h,)}
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    for i in range(arch.num_layers):
        p = f"model.layers.{i}"
        shapes.update(
            {
                f"{p}.input_layernorm.weight": (h,),
                f"{p}.post_attention_layernorm.weight": (h,),
                f"{p}.self_attn.q_proj.weight": (arch.num_attention_heads * d, h),
                f"{p}.self_attn.k_proj.weight": (arch.num_query_groups * d, h),
                f"{p}.self_attn.v_proj.weight": (arch.num_query_groups * d, h),
                f"{p}.self_attn.o_proj.weight": (h, arch.num_attention_heads * d),
            }
        )
        if arch.qk_layernorm:
            shapes.update({f"{p}.self_attn.q_norm.weight": (d,), f"{p}.self_attn.k_norm.weight": (d,)})
        if arch.is_moe:
            shapes[f"{p}.mlp.gate.weight"] = (arch.num_experts, h)
            f = arch.moe_ffn_hidden_size
            for e in range(arch.num_experts):
                shapes.update(
                    {
                        f"{p}.mlp.experts.{e}.gate_proj.weight": (f, h),
                        f"{p}.mlp.experts.{e}.up_proj.weight": (f, h),
                        f"{p}.mlp.experts.{e}.down_proj.weight": (h, f),
                    }
                )
        else:
            f = arch.ffn_hidden_size
            shapes.update(
                {
                    f"{p}.mlp.gate_proj.weight": (f, h),
                    f"{p}.mlp.up_proj.weight": (f, h),
                    f"{p}.mlp.down_proj.weight": (h, f),
                }
            )
    return shapes


# ----------------------------------------------------------------------------------------------
# Rank-local names -> canonical names

# Transformer Engine spec names -> local spec names (TE fuses the pre-norms into the next linear).
_TE_ALIASES = [
    (re.compile(r"self_attention\.linear_qkv\.layer_norm_weight$"), "input_layernorm.weight"),
    (re.compile(r"mlp\.linear_fc1\.layer_norm_weight$"), "pre_mlp_layernorm.weight"),
]
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight$")
_GROUPED_EXPERT = re.compile(r"^mlp\.experts\.(linear_fc[12])\.weight(\d+)$")  # TEGroupedMLP


def canonical_name(name: str, layer_offset: int, expert_offset: int) -> str | None:
    """The canonical name of a rank's parameter, or None for state that is not a weight."""
    if name.endswith("_extra_state"):
        return None
    match = _LAYER.match(name)
    if match is None:
        return name
    layer, rest = int(match.group(1)) + layer_offset, match.group(2)
    for pattern, replacement in _TE_ALIASES:
        if pattern.search(rest):
            rest = replacement
    expert = _LOCAL_EXPERT.match(rest)
    if expert:
        rest = f"mlp.experts.local_experts.{int(expert.group(1)) + expert_offset}.{expert.group(2)}.weight"
    grouped = _GROUPED_EXPERT.match(rest)
    if grouped:
        rest = f"mlp.experts.local_experts.{int(grouped.group(2)) + expert_offset}.{grouped.group(1)}.weight"
    return f"decoder.layers.{layer}.{rest}"


# ----------------------------------------------------------------------------------------------
# Splitting and joining


@dataclasses.dataclass(frozen=True)
class ShardGeometry:
    """What the split functions need to know about the model."""

    vocab_size: int
    padded_vocab_size: int
    num_query_groups: int
    heads_per_group: int
    kv_channels: int

    @classmethod
    def of(cls, arch: ModelArchitecture, tp: int) -> "ShardGeometry":
        return cls(
            arch.vocab_size,
            arch.padded_vocab_size(tp),
            arch.num_query_groups,
            arch.num_attention_heads // arch.num_query_groups,
            arch.kv_channels,
        )


def shard_ranges(
    kind: SplitKind, shapes: list[tuple[int, ...]], rank: int, size: int, geo: ShardGeometry
) -> list[tuple[slice, ...]]:
    """For each HF tensor of a mapping, the (rows, cols) slice this rank needs.

    Reading only these slices from safetensors keeps a rank's memory at its own share.
    """
    full = (slice(None),)
    if kind == "replicated" or size == 1 and kind != "vocab":
        return [full for _ in shapes]
    if kind == "vocab":
        per = geo.padded_vocab_size // size
        return [(slice(min(rank * per, geo.vocab_size), min((rank + 1) * per, geo.vocab_size)),)]
    if kind == "row":
        cols = shapes[0][1] // size
        return [(slice(None), slice(rank * cols, (rank + 1) * cols))]
    if kind == "qkv":
        groups = geo.num_query_groups // size
        g0, g1 = rank * groups, (rank + 1) * groups
        q_rows = geo.heads_per_group * geo.kv_channels
        return [
            (slice(g0 * q_rows, g1 * q_rows),),
            (slice(g0 * geo.kv_channels, g1 * geo.kv_channels),),
            (slice(g0 * geo.kv_channels, g1 * geo.kv_channels),),
        ]
    # column and gate_up: a contiguous block of rows of every part
    rows = shapes[0][0] // size
    return [(slice(rank * rows, (rank + 1) * rows),) for _ in shapes]


def assemble_shard(
    kind: SplitKind, parts: list[torch.Tensor], rank: int, size: int, geo: ShardGeometry
) -> torch.Tensor:
    """Build a rank's Megatron tensor from its slices of the HF tensors (see `shard_ranges`)."""
    if kind == "vocab":
        rows = parts[0]
        per = geo.padded_vocab_size // size
        if rows.shape[0] < per:  # the last shards hold Megatron's padding rows: zero them
            rows = torch.cat([rows, rows.new_zeros((per - rows.shape[0], *rows.shape[1:]))])
        return rows
    if kind == "qkv":
        q, k, v = parts
        hidden = q.shape[-1]
        groups = k.shape[0] // geo.kv_channels
        q = q.reshape(groups, geo.heads_per_group * geo.kv_channels, hidden)
        k = k.reshape(groups, geo.kv_channels, hidden)
        v = v.reshape(groups, geo.kv_channels, hidden)
        return torch.cat([q, k, v], dim=1).reshape(-1, hidden)
    if kind == "gate_up":
        return torch.cat(parts, dim=0)
    return parts[0]


def split_shards(kind: SplitKind, shards: list[torch.Tensor], geo: ShardGeometry) -> list[torch.Tensor]:
    """The inverse: full HF tensors from every rank's Megatron shard (ordered by rank)."""
    if kind == "replicated":
        return [shards[0]]
    if kind == "vocab":
        return [torch.cat(shards, dim=0)[: geo.vocab_size]]
    if kind == "row":
        return [torch.cat(shards, dim=1)]
    if kind == "column":
        return [torch.cat(shards, dim=0)]
    if kind == "gate_up":
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])]
    # qkv
    q_rows = geo.heads_per_group * geo.kv_channels
    qs, ks, vs = [], [], []
    for shard in shards:
        grouped = shard.reshape(-1, q_rows + 2 * geo.kv_channels, shard.shape[-1])
        q, k, v = grouped.split([q_rows, geo.kv_channels, geo.kv_channels], dim=1)
        qs.append(q.reshape(-1, shard.shape[-1]))
        ks.append(k.reshape(-1, shard.shape[-1]))
        vs.append(v.reshape(-1, shard.shape[-1]))
    return [torch.cat(qs), torch.cat(ks), torch.cat(vs)]
