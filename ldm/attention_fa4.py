"""FlashAttention-4 (``flash-attn-4``, Dao-AILab's CuTe-DSL kernels) as ldm's ``"fa4"`` attention backend.

The kernels are compiled at run time by NVIDIA's CUTLASS DSL (no build against torch), for Hopper (SM90) and
Blackwell (SM100/SM110) cards, in fp16 and bf16. They round the head dimension up to a multiple of 16 where
cuDNN's and FlashAttention-2's kernels round it to 64: SD-1.5's 40-wide heads do 48/40 of the work there, not 64/40.

The forward is a torch custom operator (``ldm::fa4_fwd``) with a fake implementation, so ``torch.compile`` traces it
as one opaque node and CUDA graphs record its launch. Inputs the kernels do not take (a CPU or pre-Hopper tensor,
fp32, a head dimension not a multiple of 8) go to SDPA, with one log line per kind of input, and so do inputs that
need gradients: flash-attn-4 4.0.0b36's SM90 backward computed wrong query gradients at SD's head dimensions on an
H100 (max error 0.67-2.1 against fp32 attention at head dims 40 and 80, where SDPA's bf16 is within 0.005-0.015;
docs/results/fa4-h100-2026-12-07-twenty-second.txt), so this backend is for sampling; training runs SDPA.
"""
from __future__ import annotations

import functools
import logging
import math
import os

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

ARCHS = (9, 10, 11)  # compute capability majors with kernels: Hopper, Blackwell
MAX_HEAD_DIM = {9: 256, 10: 128, 11: 128}


class FA4Unavailable(RuntimeError):
    """flash-attn-4 (or the CUTLASS DSL it compiles with) cannot be imported here."""


@functools.lru_cache(maxsize=1)
def interface():
    """``flash_attn.cute.interface``, imported once; :class:`FA4Unavailable` with the reason if it cannot be.
    FA4's on-disk cache of compiled kernels is turned on unless the environment says otherwise
    (``FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=0``): a later process loads them instead of compiling them again,
    as inductor's cache does for the compiled U-Net."""
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
    try:
        import flash_attn.cute.interface as fa  # noqa: PLC0415 (optional dependency)
    except Exception as e:  # ImportError, or the DSL's runtime failing to load
        raise FA4Unavailable(
            f"attention backend 'fa4' needs flash-attn-4 and the CUTLASS DSL (pip install 'ldm[fa4]'), which "
            f"cannot be imported: {type(e).__name__}: {e}") from e
    return fa


def kernel_for(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why FA4 has no kernel for these inputs, or None when it has one."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return "inputs that need gradients (its SM90 backward is wrong at SD's head dimensions)"
    if not q.is_cuda:
        return f"{q.device.type} tensors"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"{q.dtype}"
    major = torch.cuda.get_device_properties(q.device).major  # constant-folded by torch.compile
    if major not in ARCHS:
        return f"compute capability {major}.x (FA4 has kernels for 9.x, 10.x and 11.x)"
    d = q.shape[-1]
    if d % 8 or d > MAX_HEAD_DIM[major] or k.shape[-1] != d:
        return f"head dimension {d}"
    return None


@torch.library.custom_op("ldm::fa4_fwd", mutates_args=())
def fa4_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q (B, Lq, H, d), k (B, Lk, H, d), v (B, Lk, H, d_v), each with its last dimension contiguous ->
    softmax(q kᵀ·scale) v (B, Lq, H, d_v)."""
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)  # (B, Lq, H, d_v)
    # with the log-sum-exp (B, H, Lq), as verified on an H100: the kernel variant that the GPU tests passed
    lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32, device=q.device)
    interface()._flash_attn_fwd(q, k, v, softmax_scale=scale, return_lse=True, out=out, lse=lse)
    return out


@fa4_fwd.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@functools.lru_cache(maxsize=32)
def _fallback_note(reason: str) -> None:
    log.info("attention backend 'fa4' has no kernel for %s: those calls use SDPA", reason)


def fa4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ/√d) v through FA4. q: (B, H, Lq, d); k, v: (B, H, Lk, d) -> (B, H, Lq, d). Inputs that FA4
    has no kernel for, or that need gradients, go to SDPA (logged once per kind)."""
    reason = kernel_for(q, k, v)
    if reason is not None:
        if not torch.compiler.is_compiling():
            _fallback_note(reason)
        return F.scaled_dot_product_attention(q, k, v)
    # (B, H, L, d) -> (B, L, H, d): views, no copy where the heads were split from (B, L, H·d) projections
    out = fa4_fwd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 1.0 / math.sqrt(q.shape[-1]))
    return out.transpose(1, 2)
