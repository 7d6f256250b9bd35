"""Attention for the fast rollout engine: each sample reads only its own keys, with no GQA expansion.

Decode: one new query per sample; keys and values in the KV slots, heads-major
``[slots, kv_heads, slot_tokens, d]`` so that a slot prefix is a strided view the matmuls read in
place (no gather, no copy):

* `reference_decode_attention`: a per-sample loop over exactly each sample's length, keys copied to
  every query head: slow and obvious, the oracle the others are tested against.
* `grouped_decode_attention`: one batched grouped matmul over the slots' first ``kv_len``
  positions (a length bucket just above the longest live sample), masked past each sample's own
  length. The query heads of one KV group share its keys through a reshape, never a copy. Static
  shapes, so it traces with ``torch.compile(fullgraph=True)`` and captures into a CUDA graph.

Prefill (whole prompts packed one after another, ``cu_seqlens`` marking where each starts):
per-sequence causal SDPA with ``enable_gqa`` (torch's fused CPU kernels: no ``[heads, s, s]``
score tensor), or on CUDA in bf16 / fp16 torch's bundled FlashAttention varlen entry
(``torch.nn.attention.varlen.varlen_attn``) over the whole pack; `reference_prefill_attention` is
the oracle.

Not used for decode (yet): torch's varlen entry with ``seqused_k`` and a block table reads only each
sample's own length, but wants token-major pages ``[pages, page_tokens, heads, d]``, while these
slots are heads-major so that the grouped matmuls read them in place; flash-attn and flashinfer are
only reported when importable (`attention_entry_points`), not called.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

_VARLEN_PREFILL: Optional[bool] = None
"""Whether torch's FlashAttention varlen entry ran here (None: not tried yet)."""

DecodeAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
"""``(q [B, Hq, d], keys [B, Hkv, kv_len, d], values [B, Hkv, kv_len, d], lengths [B], scale) -> [B, Hq, d]``."""


def reference_decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, scale: float
) -> torch.Tensor:
    """The oracle: per sample, softmax over its first ``lengths[b]`` keys, GQA by explicit expansion."""
    heads, groups = q.shape[1], keys.shape[1]
    out = torch.empty_like(q)  # [B, Hq, d]
    for b, length in enumerate(lengths.tolist()):
        k = keys[b, :, :length].repeat_interleave(heads // groups, dim=0).float()  # [Hq, L, d]
        v = values[b, :, :length].repeat_interleave(heads // groups, dim=0).float()
        scores = torch.einsum("hd,hld->hl", q[b].float(), k) * scale  # [Hq, L]
        out[b] = torch.einsum("hl,hld->hd", scores.softmax(-1), v).to(q.dtype)
    return out


def grouped_decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, scale: float
) -> torch.Tensor:
    """Batched decode attention over a length bucket, masked past each sample's length."""
    batch, heads, dim = q.shape
    groups, kv_len = keys.shape[1], keys.shape[2]
    grouped_q = q.view(batch, groups, heads // groups, dim)  # [B, G, rep, d]: heads of a group share keys
    scores = torch.matmul(grouped_q, keys.transpose(-1, -2)).float() * scale  # [B, G, rep, kv_len]
    outside = torch.arange(kv_len, device=q.device)[None, :] >= lengths[:, None]  # [B, kv_len]
    scores = scores.masked_fill(outside[:, None, None, :], -float("inf"))
    out = torch.matmul(scores.softmax(-1).to(values.dtype), values)  # [B, G, rep, d]
    return out.reshape(batch, heads, dim)


def reference_prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int], scale: float
) -> torch.Tensor:
    """The oracle: per packed sequence, causal softmax attention with keys copied to every head."""
    heads, groups = q.shape[1], k.shape[1]
    out = torch.empty_like(q)  # [T, Hq, d]
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        qs = q[start:end].float()
        ks = k[start:end].repeat_interleave(heads // groups, dim=1).float()
        vs = v[start:end].repeat_interleave(heads // groups, dim=1).float()
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * scale  # [Hq, s, s]
        causal = torch.ones(end - start, end - start, dtype=torch.bool, device=q.device).tril()
        probs = scores.masked_fill(~causal, -float("inf")).softmax(-1)
        out[start:end] = torch.einsum("hqk,khd->qhd", probs, vs).to(q.dtype)
    return out


def packed_prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int], scale: float
) -> torch.Tensor:
    """Causal attention within each packed sequence: ``q [T, Hq, d], k / v [T, Hkv, d] -> [T, Hq, d]``."""
    global _VARLEN_PREFILL
    if _VARLEN_PREFILL is not False and q.device.type == "cuda" and q.dtype in (torch.bfloat16, torch.float16):
        try:
            from torch.nn.attention.varlen import varlen_attn

            cu = torch.tensor(cu_seqlens, device=q.device, dtype=torch.int32)
            longest = max(b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]))
            out = varlen_attn(q, k, v, cu, cu, longest, longest, scale=scale, window_size=(-1, 0), enable_gqa=True)
            _VARLEN_PREFILL = True
            return out
        except (ImportError, RuntimeError, TypeError, NotImplementedError) as error:
            if _VARLEN_PREFILL:  # it worked before: a real failure, not a missing entry point
                raise
            _VARLEN_PREFILL = False
            logger.info(
                "FlashAttention varlen prefill unavailable (%s: %s); per-prompt SDPA instead",
                type(error).__name__,
                error,
            )
    out = torch.empty_like(q)
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        # SDPA wants [heads, s, d]; enable_gqa lets a KV head serve its query heads without a copy.
        out[start:end] = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1),
            k[start:end].transpose(0, 1),
            v[start:end].transpose(0, 1),
            is_causal=True,
            scale=scale,
            enable_gqa=True,
        ).transpose(0, 1)
    return out


def _have_varlen() -> bool:
    """Whether this torch ships the FlashAttention varlen entry."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def attention_entry_points() -> dict[str, Optional[str]]:
    """Which attention entry points this torch / environment offers (for the GPU check's report)."""
    found: dict[str, Optional[str]] = {
        "torch": torch.__version__,
        "varlen_attn": None,
        "flash_attn": None,
        "flashinfer": None,
    }
    if _have_varlen():
        import inspect

        from torch.nn.attention.varlen import varlen_attn

        found["varlen_attn"] = str(inspect.signature(varlen_attn))
    for module in ("flash_attn", "flashinfer"):
        try:
            found[module] = getattr(__import__(module), "__version__", "importable")
        except Exception:  # noqa: BLE001 - absent or broken: not usable
            pass
    return found
