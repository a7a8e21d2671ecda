"""GroupNorm that keeps a channels_last input in channels_last when compiled.

Why: PyTorch's ``native_group_norm`` returns NCHW strides whatever its input's layout. Under ``torch.compile``
those strides are what AOT autograd records for every activation the forward saves for the backward (the norm's
output, the SiLU after it, the bf16 copy the next convolution reads), and inductor keeps them at that boundary.
The backward's ``convolution_backward`` then converts each saved input to the weights' channels_last layout inside
the ATen op, a copy inductor cannot fuse: 28 ms of a 445 ms SD-1.5 training step at 512 px and batch 64 on one
H200 (docs/BENCHMARKS.md). Asking for the input's layout on the output makes the recorded strides channels_last;
inductor writes the norm's Triton kernel in that layout directly, so the request costs no kernel of its own.

Eager mode is left exactly as ``nn.GroupNorm``: there the CUDA kernel converts anyway, and an extra request would
add a copy. The numbers are the same either way (only strides differ); parameters and state-dict keys are those of
``nn.GroupNorm``, so checkpoints load unchanged.
"""
from __future__ import annotations

import torch
from torch import nn


def is_channels_last(x: torch.Tensor) -> bool:
    """A 4-D tensor laid out NHWC (and not also NCHW-contiguous, as 1×1 maps or single channels are)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` whose compiled output keeps a channels_last input's layout (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, *spatial) -> (B, C, *spatial), in x's memory format when compiling."""
        y = super().forward(x)
        if torch.compiler.is_compiling() and is_channels_last(x):
            y = y.contiguous(memory_format=torch.channels_last)
        return y
