"""Memory-efficient core attention for the non-Transformer-Engine layer spec.

megatron-core's local `DotProductAttention` materialises the scores ``[b, heads, s, s]`` (19-39 GB
per layer at 16K tokens in bf16) and cannot take packed sequences. `SDPAttention` plugs into the
same `core_attention` hook of `SelfAttentionSubmodules` and runs torch's
`scaled_dot_product_attention` instead: flash / memory-efficient kernels on CUDA, the fused flash
kernel on CPU, neither of which stores the scores. Packed variable-length micro-batches
(`PackedSeqParams` with ``qkv_format="thd"``) attend only within each sequence: torch's
`varlen_attn` on CUDA where it exists and can take the inputs, one SDPA call per sequence otherwise.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide

ATTENTION_BACKENDS = ("auto", "sdpa", "local")
"""What `layer_spec` accepts for ``attention``: ``auto`` (Transformer Engine's attention when TE
imports, else SDPA), ``sdpa`` (`SDPAttention`) or ``local`` (megatron-core's `DotProductAttention`,
which materialises the scores and cannot take packed sequences; kept for comparisons)."""

_HALF_DTYPES = (torch.float16, torch.bfloat16)
_CAUSAL_MASK_TYPES = (AttnMaskType.causal, AttnMaskType.padding_causal, AttnMaskType.causal_bottom_right)


class PackingNotSupportedError(ValueError):
    """A packed (``thd``) micro-batch was requested from an attention module that cannot take it."""


class SDPAttention(MegatronModule):
    """Causal core attention through `torch.nn.functional.scaled_dot_product_attention`.

    Takes what megatron-core's `DotProductAttention` takes (same constructor and forward), with
    the same numerics within fp32 rounding: the softmax scale is ``softmax_scale`` or
    ``1 / sqrt(kv_channels)`` (query-key layer scaling only reorders that product, so it is folded
    in), the softmax runs in fp32 inside the kernel, q/k layernorm and RoPE have already been
    applied by the attention layer. Grouped-query attention shares each key/value head between its
    query heads without copying them (``enable_gqa``), except on CUDA where only the math kernel
    could take that (fp32, or an explicit mask): there the key/value heads are repeated, which
    costs ``[s, b, heads, d]`` and not ``[b, heads, s, s]``.

    Masking: an explicit boolean ``attention_mask`` (True = masked out, Megatron's convention)
    replaces the causal mask, as in `DotProductAttention`; otherwise a causal mask type gives
    causal attention (aligned to the last key when fewer queries than keys, as in KV-cached
    chunks), and ``no_mask`` (Megatron's KV-cached decode step) attends to every cached key.

    Attention dropout, attention bias, sliding windows, context parallelism and non-vanilla
    softmax types are refused at construction or call with an error naming the setting.
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        problems = []
        if config.context_parallel_size != 1:
            problems.append(f"context_parallel_size={config.context_parallel_size} (needs 1)")
        if dropout != 0.0:
            problems.append(f"attention_dropout={dropout} (needs 0)")
        if config.softmax_type != "vanilla":
            problems.append(f"softmax_type={config.softmax_type!r} (needs 'vanilla')")
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
            problems.append(f"window_size={config.window_size} (sliding windows are not supported)")
        if problems:
            raise ValueError(
                "SDPAttention cannot run this TransformerConfig: "
                + "; ".join(problems)
                + ". Use attention='local' or Transformer Engine's attention."
            )

        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        tp_size = pg_collection.tp.size()
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.num_query_groups_per_partition = divide(config.num_query_groups, tp_size)
        self.hidden_size_per_attention_head = config.kv_channels
        self.softmax_scale = 1.0 / math.sqrt(config.kv_channels) if softmax_scale is None else softmax_scale

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type=None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """Attention output ``[sq, b, heads/tp * d]`` (``[t, heads/tp * d]`` for packed input).

        `query` is ``[sq, b, heads/tp, d]`` and `key` / `value` ``[sk, b, groups/tp, d]``; with a
        ``thd`` `packed_seq_params` the batch dimension is gone: ``[t, heads/tp, d]`` and
        ``[t, groups/tp, d]``, the sequences laid end to end as ``cu_seqlens_q`` says.
        """
        if attention_bias is not None:
            raise ValueError("SDPAttention does not take an attention_bias")
        if packed_seq_params is not None:
            if attention_mask is not None:
                raise ValueError(
                    "SDPAttention: packed sequences take no attention_mask (the "
                    "sequence boundaries in packed_seq_params are the mask)"
                )
            return self._packed_forward(query, key, value, packed_seq_params)
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        sq, sk = query.shape[0], key.shape[0]
        allowed = None  # [b or 1, 1, sq, sk] bool, True = may attend (SDPA's convention)
        is_causal = False
        if attention_mask is not None:
            if attention_mask.dtype != torch.bool:
                raise ValueError(
                    f"SDPAttention: attention_mask must be boolean (True = masked out), got {attention_mask.dtype}"
                )
            allowed = ~attention_mask
        elif mask_type in _CAUSAL_MASK_TYPES and sq > 1:
            if sq == sk:
                is_causal = True
            else:  # a chunk of new queries after cached keys: query i sees keys up to sk - sq + i
                allowed = torch.ones(sq, sk, dtype=torch.bool, device=query.device).tril(sk - sq)
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        context = grouped_sdpa(q, k, v, self.softmax_scale, is_causal=is_causal, allowed=allowed)
        # [b, n, sq, d] -> [sq, b, n * d]
        return context.permute(2, 0, 1, 3).reshape(sq, query.shape[1], -1)

    def _packed_forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, params) -> torch.Tensor:
        """Causal attention within each packed sequence: ``[t, n, d]`` -> ``[t, n * d]``."""
        cu_seqlens = _checked_cu_seqlens(params, query.shape[0], key.shape[0])
        context = packed_causal_attention(
            query, key, value, cu_seqlens, self.softmax_scale, max_seqlen=params.max_seqlen_q
        )
        return context.reshape(context.shape[0], -1)  # [t, n * d]


def grouped_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    is_causal: bool,
    allowed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """SDPA on ``[b, heads, s, d]`` queries, ``[b, groups, s, d]`` keys / values -> ``[b, heads, s, d]``.

    Each key/value head serves ``heads / groups`` consecutive query heads (Megatron's grouping).
    `allowed` is an optional boolean mask broadcastable to ``[b, heads, sq, sk]`` (True = may
    attend). Dropout is always 0.
    """
    heads, groups = q.shape[1], k.shape[1]
    if heads % groups != 0:
        raise ValueError(f"{heads} query heads per partition is not a multiple of {groups} key/value heads")
    native_gqa = heads != groups and not (q.is_cuda and (q.dtype not in _HALF_DTYPES or allowed is not None))
    if heads != groups and not native_gqa:
        # CUDA's memory-efficient kernel (fp32, masks) has no GQA; without this repeat SDPA
        # would fall back to its math kernel, which materialises the scores.
        k = k.repeat_interleave(heads // groups, dim=1)
        v = v.repeat_interleave(heads // groups, dim=1)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=allowed, dropout_p=0.0, is_causal=is_causal, scale=scale, enable_gqa=native_gqa
    )


def packed_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float,
    max_seqlen: Optional[int] = None,
) -> torch.Tensor:
    """Causal attention of packed sequences, none attending across a boundary.

    `query` ``[t, heads, d]``, `key` / `value` ``[t, groups, d]``, sequence i at rows
    ``cu_seqlens[i]:cu_seqlens[i + 1]``; returns ``[t, heads, d]``. On CUDA torch's varlen
    FlashAttention runs all sequences in one kernel where this torch has it and it takes the
    inputs (fp16 / bf16; grouped heads need its ``enable_gqa``); otherwise each sequence is one
    SDPA call (no [t, t] block-diagonal mask: SDPA's CPU kernel would expand it to floats).
    """
    if query.is_cuda and _varlen_can_take(query, key):
        cu = cu_seqlens.to(device=query.device, dtype=torch.int32)
        if max_seqlen is None:
            max_seqlen = int((cu[1:] - cu[:-1]).max())
        return _varlen_causal(query, key, value, cu, int(max_seqlen), scale)
    bounds = cu_seqlens.tolist()
    pieces = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        # [len, n, d] -> [1, n, len, d]
        q, k, v = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (query, key, value))
        out = grouped_sdpa(q, k, v, scale, is_causal=True)
        pieces.append(out.squeeze(0).transpose(0, 1))  # [len, heads, d]
    return torch.cat(pieces, dim=0)


def _checked_cu_seqlens(params, total_q: int, total_kv: int) -> torch.Tensor:
    """The packed sequences' boundaries ``[n + 1]``, after checking `params` describes the input."""
    if params.qkv_format != "thd":
        raise ValueError(f"SDPAttention takes packed sequences in qkv_format 'thd', got {params.qkv_format!r}")
    cu_q, cu_kv = params.cu_seqlens_q, params.cu_seqlens_kv
    if cu_q is None or cu_kv is None:
        raise ValueError("PackedSeqParams.cu_seqlens_q and cu_seqlens_kv are both required")
    if not torch.equal(cu_q.cpu(), cu_kv.cpu()):
        raise ValueError("SDPAttention: self-attention needs cu_seqlens_q == cu_seqlens_kv")
    for name in ("cu_seqlens_q_padded", "cu_seqlens_kv_padded"):
        padded = getattr(params, name)
        if padded is not None and not torch.equal(padded.cpu(), cu_q.cpu()):
            raise ValueError(
                f"SDPAttention: PackedSeqParams.{name} differing from the unpadded "
                "boundaries is not supported; pack padding as its own sequence"
            )
    cu = cu_q.cpu()
    rising = int(cu[0]) == 0 and bool((cu[1:] >= cu[:-1]).all())
    if not rising or int(cu[-1]) != total_q or total_q != total_kv:
        raise ValueError(f"PackedSeqParams.cu_seqlens_q {cu.tolist()} must rise from 0 to the packed length {total_q}")
    return cu


@functools.lru_cache(maxsize=1)
def _varlen_signature() -> Optional[frozenset]:
    """The keyword names of torch's `varlen_attn`, or None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return frozenset(inspect.signature(varlen_attn).parameters)


def _varlen_can_take(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Whether torch's FlashAttention varlen entry can run these ``[t, n, d]`` CUDA tensors."""
    names = _varlen_signature()
    if names is None or query.dtype not in _HALF_DTYPES:
        return False
    if "window_size" not in names and "is_causal" not in names:
        return False
    return query.shape[1] == key.shape[1] or "enable_gqa" in names


def _varlen_causal(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float
) -> torch.Tensor:
    """torch's varlen FlashAttention, causal, on ``[t, n, d]`` tensors (signature of torch 2.10+)."""
    from torch.nn.attention.varlen import varlen_attn

    names = _varlen_signature()
    # torch 2.10 spells causality ``is_causal``; later releases ``window_size=(-1, 0)``.
    kwargs = {"window_size": (-1, 0)} if "window_size" in names else {"is_causal": True}
    if query.shape[1] != key.shape[1]:
        kwargs["enable_gqa"] = True
    if "scale" in names:
        kwargs["scale"] = scale
    elif abs(scale - query.shape[-1] ** -0.5) > 1e-12:
        raise ValueError("this torch's varlen_attn takes no softmax scale; the model's differs from 1/sqrt(head_dim)")
    return varlen_attn(query, key, value, cu, cu, max_len, max_len, **kwargs)


def packing_support_problem(model: torch.nn.Module) -> Optional[str]:
    """Why `model` cannot take packed (``thd``) micro-batches, or None when every attention can.

    SDPA and Transformer Engine's attention take packed sequences; megatron-core's local
    `DotProductAttention` asserts mid-forward, so check here before any heavy work.
    """
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    for name, module in model.named_modules():
        if isinstance(module, DotProductAttention):
            return (
                f"{name} is megatron-core's local DotProductAttention (attention='local'), "
                "which cannot take packed sequences; build the model with attention='sdpa' "
                "or 'auto'"
            )
    return None


def require_packing_support(model: torch.nn.Module) -> None:
    """Raise `PackingNotSupportedError` when `model`'s attention cannot take packed sequences."""
    problem = packing_support_problem(model)
    if problem is not None:
        raise PackingNotSupportedError(problem)
