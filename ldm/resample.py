"""×2 nearest-neighbour upsampling whose compiled backward keeps the gradient's memory layout.

Why: under ``torch.compile`` inductor decomposes ``upsample_nearest2d``'s backward into an ``index_put`` onto a
fresh zero tensor, and that tensor is NCHW whatever the gradient's layout. In a channels_last U-Net the upsampler's
input gradient then flows NCHW into the residual adds before it, and each ``convolution_backward`` there converts it
back for cuDNN (``cudnn_convolution_backward``: ``grad_output.to(input.suggest_memory_format())``). torch 2.11's
inductor keeps those traced strides: of a small SD-shaped U-Net's 98 ``convolution_backward`` calls, 8 converted
their gradient at run time, all of them upstream of an upsampler (docs/BENCHMARKS.md, 2026-12-05, sixth session).

Here the backward is the sum of the four strided views of the gradient that each input pixel was copied to:
elementwise adds, which follow the gradient's layout, and which inductor fuses into one kernel. The forward is
``F.interpolate`` itself, so compiled inference, eager mode and the numbers are unchanged (eager keeps PyTorch's own
backward kernel: one launch instead of three adds).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ldm.norm import compiling_with_grad


class _Upsample2x(torch.autograd.Function):
    """x (B, C, H, W) -> (B, C, 2H, 2W) nearest; backward: g (B, C, 2H, 2W) -> the 2×2 sums, (B, C, H, W)."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="nearest")

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        return g[:, :, 0::2, 0::2] + g[:, :, 0::2, 1::2] + g[:, :, 1::2, 0::2] + g[:, :, 1::2, 1::2]


def upsample_nearest(x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """x (B, C, H, W) -> (B, C, 2H, 2W), or (B, C, *size) when ``size`` is given, by nearest neighbour. While
    compiling a graph that needs x's gradient, the ×2 case takes the layout-keeping backward of the module docstring;
    otherwise this is ``F.interpolate``."""
    if size is not None:
        return F.interpolate(x, size=tuple(size), mode="nearest")
    if x.dim() == 4 and compiling_with_grad(x):
        return _Upsample2x.apply(x)
    return F.interpolate(x, scale_factor=2, mode="nearest")
