"""The LM head's matrix products, with inputs in the model's dtype and fp32 accumulation on GPU.

Every log-prob of the project (the student's in training, the teachers' and references' in
scoring) goes through these: logits ``hidden @ W^T`` come out in fp32 whatever the model's dtype,
so two models (or two engines) never disagree because one rounded its logits to bf16. On CUDA a
bf16 / fp16 model multiplies its own 16-bit tensors with fp32 accumulation and fp32 output
(``torch.mm(..., out_dtype=torch.float32)``): the fast tensor-core path, with no fp32 copy of a
152k x h weight per call. On CPU (and where that overload is missing) everything runs in fp32.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

logger = logging.getLogger(__name__)

_FALLBACK_LOGGED = False


def head_gemm_dtype(weight: torch.Tensor, requested: Optional[torch.dtype] = None) -> torch.dtype:
    """The dtype the head's GEMM inputs use: `requested`, else the weight's on CUDA, else fp32."""
    if requested is not None:
        return requested
    if weight.is_cuda and weight.dtype in (torch.bfloat16, torch.float16):
        return weight.dtype
    return torch.float32


def fp32_mm(a: torch.Tensor, b: torch.Tensor, gemm_dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` as fp32, its inputs cast to `gemm_dtype` (fp32 accumulation in every case)."""
    global _FALLBACK_LOGGED
    if gemm_dtype == torch.float32 or not a.is_cuda:
        return a.float() @ b.float()
    try:
        return torch.mm(a.to(gemm_dtype), b.to(gemm_dtype), out_dtype=torch.float32)
    except (RuntimeError, TypeError) as err:  # a torch without the out_dtype overload
        if not _FALLBACK_LOGGED:
            logger.warning("16-bit LM-head GEMMs with fp32 output are not available (%s); using fp32", err)
            _FALLBACK_LOGGED = True
        return a.float() @ b.float()


def fp32_addmm_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, gemm_dtype: torch.dtype) -> None:
    """``out += a @ b`` for an fp32 accumulator `out` (in place on the fp32 path)."""
    if gemm_dtype == torch.float32 or not a.is_cuda:
        out.addmm_(a.float(), b.float())
    else:
        out += fp32_mm(a, b, gemm_dtype)
