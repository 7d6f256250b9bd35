"""Attention for the fast rollout engine: each sample reads only its own keys, with no GQA expansion.

Decode (one new query per sample, keys in the KV slots ``[slots, slot_tokens, kv_heads, d]``):

* `reference_decode_attention`: a per-sample loop over exactly each sample's length, keys copied to
  every query head: slow and obvious, the oracle the others are tested against.
* `grouped_decode_attention`: one batched grouped matmul over the slots' first ``kv_len``
  positions (a length bucket), masked past each sample's length. The query heads of one KV group
  share its keys through a reshape, never a copy. Static shapes, so it traces with
  ``torch.compile(fullgraph=True)`` and captures into a CUDA graph.
* `paged_varlen_decode_attention` (CUDA): torch's bundled FlashAttention varlen entry
  (``torch.nn.attention.varlen.varlen_attn``) with ``seqused_k`` and a block table over the slots,
  which reads only each sample's own length. Used only where `decode_attention_backend` found it
  to run and agree with the grouped kernel on this machine.

Prefill (whole prompts packed one after another, ``cu_seqlens`` marking where each starts):
per-sequence causal SDPA with ``enable_gqa`` (torch's fused CPU / flash kernels; no
``[heads, s, s]`` score tensor), or the varlen entry on CUDA; `reference_prefill_attention` is the
oracle.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

DecodeAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
"""``(q [B, Hq, d], keys [B, kv_len, Hkv, d], values [B, kv_len, Hkv, d], lengths [B], scale) -> [B, Hq, d]``."""

VARLEN_PAGE_TOKENS = 256
"""Page size of the slots as FlashAttention's paged KV sees them (its kernels want multiples of 256)."""


def reference_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                               scale: float) -> torch.Tensor:
    """The oracle: per sample, softmax over its first ``lengths[b]`` keys, GQA by explicit expansion."""
    heads, groups = q.shape[1], keys.shape[2]
    out = torch.empty_like(q)  # [B, Hq, d]
    for b, length in enumerate(lengths.tolist()):
        k = keys[b, :length].repeat_interleave(heads // groups, dim=1).float()  # [L, Hq, d]
        v = values[b, :length].repeat_interleave(heads // groups, dim=1).float()
        scores = torch.einsum("hd,lhd->hl", q[b].float(), k) * scale  # [Hq, L]
        out[b] = torch.einsum("hl,lhd->hd", scores.softmax(-1), v).to(q.dtype)
    return out


def grouped_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                             scale: float) -> torch.Tensor:
    """Batched decode attention over a length bucket, masked past each sample's length."""
    batch, heads, dim = q.shape
    kv_len, groups = keys.shape[1], keys.shape[2]
    grouped_q = q.view(batch, groups, heads // groups, dim)  # [B, G, rep, d]: heads of a group share keys
    scores = torch.matmul(grouped_q, keys.permute(0, 2, 3, 1)).float() * scale  # [B, G, rep, kv_len]
    outside = torch.arange(kv_len, device=q.device)[None, :] >= lengths[:, None]  # [B, kv_len]
    scores = scores.masked_fill(outside[:, None, None, :], -float("inf"))
    probs = scores.softmax(-1).to(values.dtype)
    out = torch.matmul(probs, values.permute(0, 2, 1, 3))  # [B, G, rep, d]
    return out.reshape(batch, heads, dim)


def paged_varlen_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                                  lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """FlashAttention varlen over the slots seen as pages; reads only each sample's own length (CUDA).

    `keys` / `values` must be the first B slots with a whole number of `VARLEN_PAGE_TOKENS` pages.
    """
    from torch.nn.attention.varlen import varlen_attn

    batch, slot_tokens, groups, dim = keys.shape
    pages = slot_tokens // VARLEN_PAGE_TOKENS
    paged_k = keys.reshape(batch * pages, VARLEN_PAGE_TOKENS, groups, dim)  # a view: slots are contiguous
    paged_v = values.reshape(batch * pages, VARLEN_PAGE_TOKENS, groups, dim)
    block_table = (torch.arange(batch, device=q.device, dtype=torch.int32)[:, None] * pages
                   + torch.arange(pages, device=q.device, dtype=torch.int32)[None, :])  # [B, pages]
    cu_seq_q = torch.arange(batch + 1, device=q.device, dtype=torch.int32)  # one query per sample
    return varlen_attn(q, paged_k, paged_v, cu_seq_q, None, 1, slot_tokens, scale=scale, enable_gqa=True,
                       seqused_k=lengths.to(torch.int32), block_table=block_table)


def decode_attention_backend(device: torch.device, slot_tokens: int, dtype: torch.dtype) -> tuple[str, DecodeAttention]:
    """The fastest decode attention that works here: ``(name, function)``.

    On CUDA, the FlashAttention varlen entry when this torch has it, the slot length is a whole number
    of pages, and a small probe agrees with the grouped kernel; else the grouped kernel (CPU always).
    """
    if device.type != "cuda" or slot_tokens % VARLEN_PAGE_TOKENS:
        return "grouped", grouped_decode_attention
    try:
        generator = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(3, 4, 64, device=device, dtype=dtype, generator=generator)
        kv = torch.randn(2, 3, VARLEN_PAGE_TOKENS, 2, 64, device=device, dtype=dtype, generator=generator)
        lengths = torch.tensor([1, 100, VARLEN_PAGE_TOKENS], device=device)
        got = paged_varlen_decode_attention(q, kv[0], kv[1], lengths, 0.125)
        want = grouped_decode_attention(q, kv[0], kv[1], lengths, 0.125)
        if not torch.allclose(got.float(), want.float(), atol=2e-2, rtol=2e-2):
            raise RuntimeError(f"disagrees with the grouped kernel by {(got - want).abs().max().item():.3g}")
    except Exception as error:  # noqa: BLE001 - any failure means: not usable on this build
        logger.info("FlashAttention varlen decode not used (%s: %s); grouped attention over length buckets",
                    type(error).__name__, error)
        return "grouped", grouped_decode_attention
    return "varlen", paged_varlen_decode_attention


def reference_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int],
                                scale: float) -> torch.Tensor:
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


def packed_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int],
                             scale: float) -> torch.Tensor:
    """Causal attention within each packed sequence: ``q [T, Hq, d], k / v [T, Hkv, d] -> [T, Hq, d]``."""
    if q.device.type == "cuda" and q.dtype in (torch.bfloat16, torch.float16) and _have_varlen():
        from torch.nn.attention.varlen import varlen_attn

        cu = torch.tensor(cu_seqlens, device=q.device, dtype=torch.int32)
        longest = max(b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]))
        return varlen_attn(q, k, v, cu, cu, longest, longest, scale=scale, window_size=(-1, 0), enable_gqa=True)
    out = torch.empty_like(q)
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        # SDPA wants [heads, s, d]; enable_gqa lets a KV head serve its query heads without a copy.
        out[start:end] = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1), k[start:end].transpose(0, 1), v[start:end].transpose(0, 1),
            is_causal=True, scale=scale, enable_gqa=True).transpose(0, 1)
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
    found: dict[str, Optional[str]] = {"torch": torch.__version__, "varlen_attn": None, "flash_attn": None,
                                       "flashinfer": None}
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
