"""The U-Net's 2-D convolution: ``nn.Conv2d`` whose output gradient reaches cuDNN in channels_last when compiled.

Why: in a compiled channels_last training step, the gradient of a convolution's output is written by inductor's
Triton kernels (GroupNorm's backward, the residual sums) in whatever layout inductor settles on for a buffer an extern
kernel reads, and torch 2.11 settles on NCHW for 25 of SD-1.5's 98 ``convolution_backward`` calls (23 of them the
ResBlocks' 3×3 convolutions; ``scripts/layout_check.py --device cuda`` on an H100, 2026-12-06). cuDNN's
backward then converts each one to its input's channels_last layout inside the ATen op (``_to_copy``, a copy inductor
cannot fuse): 8.2 ms of a 437 ms step at 512 px and batch 64 on an H100. :class:`Conv2d` passes its output through an
identity whose backward asks for channels_last strides on the incoming gradient with inductor's stride-order prim
(:func:`ldm.norm.force_channels_last`): the buffer is then written NHWC by the kernel that computes it, so there is
nothing left to convert. Eager calls and inference are exactly ``nn.Conv2d``; the parameters and state-dict keys are
``nn.Conv2d``'s, so checkpoints load unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from ldm.norm import compiling_with_grad, force_channels_last, is_channels_last

# Off: the compiled backward takes the gradient in inductor's layout (bench.py's candidate "conv-grad-any").
GRAD_CHANNELS_LAST = True


class _ChannelsLastGrad(torch.autograd.Function):
    """Identity forward; the backward returns the gradient with channels_last strides."""

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 - autograd's ctx
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return force_channels_last(grad)  # (B, C, H, W), NHWC strides


def grad_channels_last(y: torch.Tensor) -> torch.Tensor:
    """y unchanged; in a compiled graph with gradients and a channels_last y, its gradient comes back NHWC."""
    if GRAD_CHANNELS_LAST and compiling_with_grad(y) and is_channels_last(y):
        return _ChannelsLastGrad.apply(y)
    return y


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same arguments, parameters and keys) with :func:`grad_channels_last` on its output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, H', W')."""
        return grad_channels_last(super().forward(x))
