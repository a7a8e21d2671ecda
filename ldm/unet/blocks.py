"""Convolutional building blocks of the U-Net: ResBlock, Downsample, Upsample and the sequential container.

Attribute names follow the original LDM ``openaimodel.py`` (``in_layers``, ``emb_layers``, ``out_layers``,
``skip_connection``, ``op``, ``conv``) so that released Stable Diffusion weights load without any key mapping.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.norm import GroupNorm
from ldm.resample import upsample_nearest
from ldm.unet.conv import Conv2d

# GroupNorm eps of the ResBlocks and the output head (the original GroupNorm32 uses torch's default).
RESBLOCK_NORM_EPS = 1e-5
NORM_GROUPS = 32


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter: residual branches start as the identity (Nichol & Dhariwal 2021)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def run_maybe_checkpointed(enabled: bool, module: nn.Module, fn: Callable[..., torch.Tensor],
                           *args: torch.Tensor | None) -> torch.Tensor:
    """Run ``fn(*args)``, through activation checkpointing when ``enabled`` and ``module`` is training with grad.

    Non-reentrant checkpointing keeps only the inputs and recomputes ``fn`` during backward; outside training
    (eval, ``torch.no_grad``) it would only cost time, so it is skipped.
    """
    if enabled and module.training and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def repeat_batch(t: torch.Tensor, n: int) -> torch.Tensor:
    """(B, ...) -> (n, ...), n a multiple of B: [t; t; ...]. ``torch.cat`` keeps t's memory format (a channels_last
    skip stays channels_last in eager mode; ``Tensor.repeat`` would return it contiguous)."""
    return t if t.shape[0] == n else torch.cat([t] * (n // t.shape[0]))


def film(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """h · (1 + scale) + shift, for h (G·B, ...) and shift, scale (B, ...) that broadcast to one item of h: each of
    the G groups of h gets the same B conditioning rows, without building the repeat (h viewed as (G, B, ...)).

    With one group (training, unguided sampling) it is the plain expression: the (1, B, ...) view would make a
    shift of h's shape (a transformer's residual x) broadcast over the group dimension, and its gradient a sum over
    that size-1 dimension, which autograd traces as NCHW whatever x's layout; the convolutions before it in the
    network then each convert that gradient for cuDNN in their backward (torch 2.11's inductor keeps the traced
    strides: 31 of a small SD-shaped U-Net's 98 convolution_backward calls converted with the view, 8 without;
    docs/BENCHMARKS.md, 2026-12-05, sixth session)."""
    if h.shape[0] == shift.shape[0]:  # G = 1
        return h + shift if scale is None else h * (1 + scale) + shift
    g = h.unflatten(0, (-1, shift.shape[0]))  # (G, B, ...)
    return (g + shift if scale is None else g * (1 + scale) + shift).flatten(0, 1)


def check_unadapted(owner: str, *linears: nn.Module) -> None:
    """Fused or hoisted projections copy these Linears' weights: one replaced since (a LoRA adapter attached after
    ``fuse_projections()``) would be bypassed without a word, so it is an error."""
    if any(type(m) is not nn.Linear for m in linears):
        raise RuntimeError(f"{owner}: a projection was replaced (an adapter attached?) after fuse_projections(); call "
                           "fuse_projections() again, or fuse_projections(False)")


class TimestepBlock(nn.Module):
    """A block whose forward takes the time embedding: ``forward(x, emb, emb_out=None)``, ``emb_out`` being its
    projection of ``emb`` when the U-Net hoisted it (:class:`Hoisted`)."""


class ContextBlock(nn.Module):
    """A block whose forward takes the cross-attention context: ``forward(x, context, hoisted=None)``."""


class Hoisted(NamedTuple):
    """The conditioning projections of one U-Net call, computed for every block at once (inference; see
    ``UNetModel.fuse_projections``): ``emb_out[i]`` is emb_layers(emb) of the ResBlock whose ``hoist_index`` is i,
    (B, C_out_i); ``kv[j]`` is [K ‖ V] of the cross-attention whose ``hoist_index`` is j, (B, L, 2·inner_j)."""

    emb_out: tuple[torch.Tensor, ...]
    kv: tuple[torch.Tensor, ...]

    def emb_for(self, block: nn.Module) -> torch.Tensor | None:
        i = getattr(block, "hoist_index", None)
        return None if i is None else self.emb_out[i]

    def kv_for(self, attn: nn.Module) -> torch.Tensor | None:
        j = getattr(attn, "hoist_index", None)
        return None if j is None or not self.kv else self.kv[j]


class TimestepEmbedSequential(nn.Sequential):
    """``nn.Sequential`` that hands ``emb`` to :class:`TimestepBlock` children and ``context`` to
    :class:`ContextBlock` children (the original ``TimestepEmbedSequential``), with their :class:`Hoisted`
    projections when the U-Net computed them."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None,
                hoisted: Hoisted | None = None, size: tuple[int, int] | None = None) -> torch.Tensor:
        """``size``: the (H, W) an upsampling layer of this block produces, when it is not 2× its input (a latent
        side not divisible by the U-Net's total downsampling, e.g. 65 = 520 px / 8 for SD)."""
        for layer in self:
            if isinstance(layer, TimestepBlock):
                emb_out = None if hoisted is None else hoisted.emb_for(layer)
                x = layer(x, emb, emb_out) if size is None else layer(x, emb, emb_out, size=size)
            elif isinstance(layer, ContextBlock):
                x = layer(x, context) if hoisted is None else layer(x, context, hoisted)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """×2 nearest-neighbour upsampling, then an optional 3×3 conv (key ``conv``)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = Conv2d(channels, self.out_channels, 3, padding=1)
        elif self.out_channels != channels:
            raise ValueError(f"Upsample without a conv cannot change channels ({channels} -> {self.out_channels})")

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, C, H, W) → (B, C_out, 2H, 2W), or (B, C_out, *size) when ``size`` is given (diffusers'
        ``upsample_size``: the skip's size below an odd side)."""
        x = upsample_nearest(x, size)  # (B, C, 2H, 2W) or (B, C, *size)
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """×2 downsampling: a stride-2 3×3 conv, or 2×2 average pooling (key ``op`` either way)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.op: nn.Module = Conv2d(channels, self.out_channels, 3, stride=2, padding=1)
        elif self.out_channels != channels:
            raise ValueError(f"Downsample without a conv cannot change channels ({channels} -> {self.out_channels})")
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)  # (B, C', H/2, W/2)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the time embedding (Ho et al. 2020, with the ADM options).

    h = in_layers(x) (GroupNorm → SiLU → conv3×3); h += emb_layers(emb) (or FiLM-style scale/shift of the second
    norm when ``use_scale_shift_norm``); h = out_layers(h) (GroupNorm → SiLU → Dropout → zero-init conv3×3);
    return skip_connection(x) + h. ``up``/``down`` resample inside the block (``resblock_updown``).
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float = 0.0, out_channels: int | None = None,
                 use_conv: bool = False, use_scale_shift_norm: bool = False, use_checkpoint: bool = False,
                 up: bool = False, down: bool = False) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        c_out = self.out_channels
        self.in_layers = nn.Sequential(
            GroupNorm(NORM_GROUPS, channels, eps=RESBLOCK_NORM_EPS), nn.SiLU(),
            Conv2d(channels, c_out, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        emb_out = 2 * c_out if use_scale_shift_norm else c_out  # scale and shift, or a bias
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.hoist_index: int | None = None  # its slot in the U-Net's Hoisted.emb_out, when hoisted
        self.out_layers = nn.Sequential(
            GroupNorm(NORM_GROUPS, c_out, eps=RESBLOCK_NORM_EPS), nn.SiLU(), nn.Dropout(p=dropout),
            zero_module(Conv2d(c_out, c_out, 3, padding=1)),
        )
        if c_out == channels:
            self.skip_connection: nn.Module = nn.Identity()
        elif use_conv:
            self.skip_connection = Conv2d(channels, c_out, 3, padding=1)
        else:
            self.skip_connection = Conv2d(channels, c_out, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, emb_out: torch.Tensor | None = None,
                size: tuple[int, int] | None = None) -> torch.Tensor:
        """x: (B, C, H, W), emb: (B, emb_channels) -> (B, C_out, H', W'). ``emb_out``: emb_layers(emb), (B, C_out
        or 2·C_out), when the U-Net computed it with the other blocks' (:class:`Hoisted`). ``size``: (H', W') of
        an ``up`` block when it is not (2H, 2W)."""
        return run_maybe_checkpointed(self.use_checkpoint, self, self._forward, x, emb, emb_out, size)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor, emb_out: torch.Tensor | None,
                 size: tuple[int, int] | None = None) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)  # (B, C, H, W)
            h = self.in_layers[-1](self._resample(self.h_upd, h, size))  # (B, C_out, H', W')
            skip = self.skip_connection(self._resample(self.x_upd, x, size))  # (B, C_out, H', W')
        else:
            h = self.in_layers(x)  # (B, C_out, H, W)
            skip = self.skip_connection(x)  # (B, C_out, H, W)
        if emb_out is None:
            emb_out = self.emb_layers(emb)  # (B, C_out or 2·C_out)
        else:
            check_unadapted("ResBlock", self.emb_layers[1])
        # (B, C_out or 2·C_out, 1, 1); B may divide x's batch: the same timestep for G copies (UNetModel's repeat)
        emb_out = emb_out.to(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)  # (B, C_out, 1, 1) each
            h = self.out_layers[1:](film(self.out_layers[0](h), shift, scale))  # (B, C_out, H', W')
        else:
            h = self.out_layers(film(h, emb_out))  # (B, C_out, H', W')
        return skip + h

    @staticmethod
    def _resample(m: nn.Module, x: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
        return m(x, size) if isinstance(m, Upsample) else m(x)
