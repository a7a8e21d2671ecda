"""Triton kernels of the fast inference path, each registered as a torch op that ``torch.compile`` keeps whole.

- :mod:`ldm.kernels.geglu`: the feed-forward's GEGLU as one kernel, a·GELU(g) computed from the projection's
  accumulators (the unfused layer writes [a ‖ g] to memory and reads it back).
- :mod:`ldm.kernels.short_attention`: attention over a key sequence that fits one tile (the 77 text tokens of
  cross-attention), in one pass.

They run where they were measured faster than what the compiled U-Net runs without them (``scripts/bench_triton.py``
on an H200, docs/BENCHMARKS.md): CUDA tensors in fp16/bf16 on a compute-capability-9.0 card, with gradients off,
at the shapes each module's ``applies`` accepts. Elsewhere the modules keep the library kernels. ``ENABLED = False``
turns them off for everything traced or run afterwards.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

ENABLED = True
MEASURED_CAPABILITIES = ((9, 0),)  # the cards the dispatch rules were measured on (H100, H200)


@functools.lru_cache(maxsize=1)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=8)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def available(t: torch.Tensor) -> bool:
    """Whether the kernels may run on ``t``: :data:`ENABLED`, a CUDA fp16/bf16 tensor on a card of
    :data:`MEASURED_CAPABILITIES`, gradients off, Triton installed."""
    return (ENABLED and t.is_cuda and t.dtype in (torch.float16, torch.bfloat16) and not torch.is_grad_enabled()
            and _capability(t.device.index or 0) in MEASURED_CAPABILITIES and triton_importable())


def geglu_op() -> Callable[..., torch.Tensor]:
    """``torch.ops.ldm.geglu`` (registered on first use)."""
    from ldm.kernels import geglu  # noqa: F401, PLC0415 (imports Triton)

    return torch.ops.ldm.geglu


def short_attention_op() -> Callable[..., torch.Tensor]:
    """``torch.ops.ldm.short_attention`` (registered on first use)."""
    from ldm.kernels import short_attention  # noqa: F401, PLC0415 (imports Triton)

    return torch.ops.ldm.short_attention


# Where each kernel beat the library path at SD-1.5's shapes on an H200 (docs/BENCHMARKS.md, 2026-12-04 fourth
# session). GEGLU: 36 against 48 µs at 640 input channels (32×32 latents, batch 2), 275 against 345 at batch 16; at
# 320 channels (64×64 latents) a tie at batch 2 and 8% slower at batch 16, so the library path stays there.
GEGLU_MIN_IN = 640
# Short attention: 5.9 against 8.4 µs (cuDNN) for 2·8 heads × 1024 queries, 6.4 against 8.8 for 2·8 × 256; slower
# from 32 K query rows (B·H·Lq) up, where cuDNN's kernel fills the card.
SHORT_ATTENTION_MAX_KEYS = 128
SHORT_ATTENTION_MAX_D = 256
SHORT_ATTENTION_MAX_ROWS = 16384


def geglu_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether ``torch.ops.ldm.geglu`` should compute GEGLU(x) with this projection."""
    return (bias is not None and x.dtype == weight.dtype == bias.dtype and x.shape[-1] >= GEGLU_MIN_IN
            and available(x))


def short_attention_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether ``torch.ops.ldm.short_attention`` should compute this attention: q (B, H, Lq, d), k, v (B, H, Lk, d)."""
    b, h, lq, d = q.shape
    return (k.shape[-2] <= SHORT_ATTENTION_MAX_KEYS and d <= SHORT_ATTENTION_MAX_D
            and b * h * lq <= SHORT_ATTENTION_MAX_ROWS and q.dtype == k.dtype == v.dtype and available(q))
