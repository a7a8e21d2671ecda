"""Attention kernels shared by the U-Net and the autoencoder.

One function, :func:`attention`, computes softmax(q kᵀ / √d) v with a selectable backend:

- ``"sdpa"`` (default): :func:`torch.nn.functional.scaled_dot_product_attention`, which picks the flash,
  cuDNN or memory-efficient kernel the card has (torch 2.11 on an H200 already picks cuDNN's, the fastest there).
- ``"cudnn"``: the same SDPA call with cuDNN's fused attention forced first (then flash, memory-efficient, math, so
  it runs everywhere), for builds whose SDPA picks flash first; it costs 25–60 µs of Python per call in eager mode
  and nothing inside ``torch.compile`` (``scripts/bench.py`` times every kernel).
- ``"flash"``: likewise with FlashAttention-2 first (then cuDNN, memory-efficient, math), the kernel to compare
  against cuDNN's where their backward passes differ (``scripts/bench.py --only attention`` times both).
- ``"xformers"``: ``xformers.ops.memory_efficient_attention`` when xformers is installed *and* its kernels load
  for this torch build (PyPI's 0.0.35 imports on torch 2.11+cu130 but cannot load its CUDA extension, see
  REFERENCE.md); otherwise a clear :class:`AttentionBackendError`.
- ``"fa4"``: FlashAttention-4's forward (``pip install 'ldm[fa4]'``, :mod:`ldm.attention_fa4`): CuTe-DSL kernels
  for Hopper and Blackwell that round SD-1.5's 40-wide heads up to 48, not 64, for sampling; inputs that need
  gradients (its SM90 backward is wrong at SD's head dimensions) and inputs without a kernel go to SDPA.
- ``"math"``: the plain einsum formulation, for CPU debugging and as the reference.

``upcast=True`` computes fp16/bf16 attention in fp32 and casts back (SD 2.x overflows in fp16 without it).
"""
from __future__ import annotations

import functools
import logging
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ldm.attention_fa4 import FA4Unavailable, fa4_attention
from ldm.attention_fa4 import interface as fa4_interface

log = logging.getLogger(__name__)

BACKENDS = ("sdpa", "cudnn", "flash", "xformers", "fa4", "math")


class AttentionBackendError(RuntimeError):
    """The requested attention backend is unknown or cannot run here."""


def check_backend(backend: str) -> str:
    """Validate a backend name early (at model construction), raising a message that names the problem."""
    if backend not in BACKENDS:
        raise AttentionBackendError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "xformers":
        _xformers_ops()
    if backend == "fa4":
        try:
            fa4_interface()
        except FA4Unavailable as e:
            raise AttentionBackendError(str(e)) from e
    return backend


@functools.lru_cache(maxsize=1)
def _xformers_ops():
    try:
        import xformers.ops as xops  # noqa: PLC0415 (optional dependency)
    except Exception as e:  # ImportError, or a broken build raising at import
        raise AttentionBackendError(
            f"attention backend 'xformers' was asked for but xformers cannot be imported ({e}); "
            "install a build matching this torch (pip install ldm[xformers]) or use attn_backend='sdpa'"
        ) from e
    return xops


def _xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    xops = _xformers_ops()
    # xformers wants (B, L, H, d)
    try:
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    except NotImplementedError as e:
        raise AttentionBackendError(
            "xformers is installed but has no kernel for these inputs on this build "
            f"(device={q.device}, dtype={q.dtype}); its C++/CUDA extensions probably do not match torch "
            f"{torch.__version__}. Use attn_backend='sdpa'. xformers said: {str(e).splitlines()[0]}"
        ) from e
    return out.transpose(1, 2)


# SDPA's kernels in the "cudnn" and "flash" backends' priority orders (each falls back to the next where it has no
# kernel for the inputs)
CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
FLASH_FIRST = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
PRIORITIES = {"cudnn": CUDNN_FIRST, "flash": FLASH_FIRST}


_SETTLED: set[str] = set()  # device types whose default SDPA order torch has already settled in this process


def settle_default_order(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Have torch settle its default SDPA kernel order for ``q``'s device before an order is forced.

    torch fixes the CUDA default order at its first kernel selection in a process (cuDNN first on Hopper and
    Blackwell with cuDNN newer than 9.15, flash first before that). ``sdpa_kernel(..., set_priority=True)`` saves
    the order in place when it is entered and puts it back on exit; entered before that first selection, it saves
    the unsettled flash-first list, and every later plain SDPA call of the process (``attn_backend: sdpa``,
    diffusers, open_clip) skips cuDNN. One selection outside the context (no kernel runs) settles it."""
    kind = q.device.type
    if torch.compiler.is_compiling() or kind != "cuda" or kind in _SETTLED:  # compiled: chosen when traced
        return
    _SETTLED.add(kind)
    try:
        torch._fused_sdp_choice(q, k, v)
    except RuntimeError:  # no kernel for these inputs: the order is settled all the same, and the call below says why
        pass


def sdpa_in_order(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, order: list[SDPBackend]) -> torch.Tensor:
    """SDPA restricted to the kernels in ``order``, tried in that order (the process's default order is kept)."""
    settle_default_order(q, k, v)
    with sdpa_kernel(order, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v)


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The einsum formulation. As in SDPA's kernels, q is scaled before the product (q·kᵀ of fp16 activations can
    pass 65504 where q·kᵀ/√d does not) and the softmax is taken in fp32 (as autocast does in the original)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    w = torch.einsum("bhid,bhjd->bhij", q * scale, k)  # (B, H, Lq, Lk)
    p = w.softmax(dim=-1, dtype=torch.promote_types(w.dtype, torch.float32)).to(v.dtype)  # float64 stays float64
    return torch.einsum("bhij,bhjd->bhid", p, v)  # (B, H, Lq, d)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa", upcast: bool = False
) -> torch.Tensor:
    """softmax(q kᵀ/√d) v.

    Args:
        q: (B, H, Lq, d); k, v: (B, H, Lk, d).
        backend: one of :data:`BACKENDS`.
        upcast: compute in fp32 when q is fp16 or bf16, and cast the result back to ``q.dtype``.
    Returns:
        (B, H, Lq, d)
    """
    dtype = q.dtype
    if upcast and q.element_size() < 4:  # fp16 / bf16 (float64 stays float64: "up", never down)
        q, k, v = q.float(), k.float(), v.float()
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v)
    elif backend in PRIORITIES:
        out = sdpa_in_order(q, k, v, PRIORITIES[backend])
    elif backend == "xformers":
        out = _xformers_attention(q, k, v)
    elif backend == "fa4":
        out = fa4_attention(q, k, v)
    elif backend == "math":
        out = _math_attention(q, k, v)
    else:
        raise AttentionBackendError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return out.to(dtype)
