"""Triton kernels of the fast inference path, each registered as a torch op that ``torch.compile`` keeps whole.

- :mod:`ldm.kernels.group_norm`: GroupNorm (and the SiLU after it) of a channels_last activation in one kernel, one
  program per (sample, group): statistics and normalization in the same launch, where inductor's lowering of the
  same norm takes three (the statistics, μ and 1/σ per group, the normalization).

They run where :func:`available` says: CUDA tensors in fp16/bf16 on a card of :data:`MEASURED_CAPABILITIES`, with
gradients off, Triton importable. ``ENABLED = False`` turns them off for everything traced or run afterwards. (A
Triton GEGLU and a one-tile attention lived here once; they lost to cuBLAS and cuDNN in the compiled step and were
removed, docs/BENCHMARKS.md, 2026-12-04 fourth session.)
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


def group_norm_op() -> Callable[..., torch.Tensor]:
    """``torch.ops.ldm.group_norm`` (registered on first use)."""
    from ldm.kernels import group_norm  # noqa: F401, PLC0415 (imports Triton)

    return torch.ops.ldm.group_norm
