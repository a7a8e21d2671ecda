"""The U-Net's transformer: SpatialTransformer → BasicTransformerBlock → CrossAttention + GEGLU feed-forward.

This is the conditioning mechanism of Rombach et al. 2022 (§3.3, eq. 3): Attention(Q, K, V) = softmax(QKᵀ/√d)·V
with Q = W_Q·φ(z_t) from the image features and K = W_K·τ(y), V = W_V·τ(y) from the text tokens. Names follow
the original ``ldm/modules/attention.py`` so released weights load unchanged. The softmax itself is
:func:`ldm.attention.attention`, whose backend ("sdpa", "xformers", "math") and fp32 upcast can be switched at run time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.attention import attention, check_backend
from ldm.norm import GroupNorm, compiling_with_grad
from ldm.unet.blocks import (
    ContextBlock,
    Hoisted,
    check_unadapted,
    film,
    repeat_batch,
    run_maybe_checkpointed,
    zero_module,
)
from ldm.unet.conv import Conv2d

# The transformer's GroupNorm eps (the original ``Normalize``), unlike the ResBlocks' 1e-5.
TRANSFORMER_NORM_EPS = 1e-6
# GEGLU's projection as two matmuls (the rows of ``proj`` for a and for g) in compiled training graphs: the gradient of
# [a ‖ g] is then two tensors that one pointwise kernel writes, reading a, g and the incoming gradient once, instead
# of chunk's backward, a concatenation that inductor writes as one masked kernel evaluating both halves' formulas for
# every element. The 512 px training step on an H100: 146.6 against 144.0 img/s (docs/BENCHMARKS.md, 12-06). Eager
# calls and inference run the one matmul; bench.py's candidate "geglu-chunk" turns it off.
GEGLU_SPLIT_GRAD = True


class CrossAttention(nn.Module):
    """Multi-head attention of queries x over keys/values from ``context`` (self-attention when it is None).

    ``to_q``, ``to_k``, ``to_v`` have no bias; ``to_out.0`` has one (``to_out.1`` is dropout).
    """

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0, backend: str = "sdpa", upcast: bool = False) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        self.is_self_attention = context_dim is None
        context_dim = context_dim or query_dim
        self.heads, self.dim_head = heads, dim_head
        self.backend, self.upcast = check_backend(backend), upcast
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))
        # [W_Q; W_K; W_V] (self-attention) or [W_K; W_V] (cross): one matmul instead of three (or two); inference
        # only, not saved (the state dict keeps the three weights), rebuilt by fuse_projections()
        self.register_buffer("fused_weight", None, persistent=False)
        self.hoist_index: int | None = None  # its slot in the U-Net's Hoisted.kv, when K and V are hoisted
        # fuse_projections() was asked for (and not undone): a hoisted module has no fused_weight but remembers this,
        # so that ending the hoist fuses only the modules that were fused
        self.fuse_requested = False

    def fuse_projections(self) -> bool:
        """Concatenate the projection weights for one matmul (inference: call again after changing weights).

        Returns False, fusing nothing, when a projection is not a plain Linear (LoRA adapters attached: their update
        would be lost; merge them first). A cross-attention whose K and V the U-Net hoists (``hoist_index`` set, see
        ``UNetModel.hoist_conditioning``) keeps no copy of its own: [W_K; W_V] is already part of the U-Net's."""
        if any(type(m) is not nn.Linear for m in (self.to_q, self.to_k, self.to_v)):
            self.fused_weight, self.fuse_requested = None, False
            return False
        self.fuse_requested = True
        if self.hoist_index is not None:  # the U-Net computes K and V (Hoisted.kv): a second copy would be unused
            self.fused_weight = None
            return True
        parts = [self.to_k.weight, self.to_v.weight]
        if self.is_self_attention:
            parts.insert(0, self.to_q.weight)
        self.fused_weight = torch.cat(parts).detach().clone()  # (3·inner or 2·inner, in)
        return True

    def unfuse_projections(self) -> None:
        """Back to the three separate projections (training, weight changes)."""
        self.fused_weight, self.fuse_requested = None, False

    def _project(self, x: torch.Tensor, context: torch.Tensor | None,
                 kv: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """q (B, N, H·d), k and v (B, L, H·d); ``kv``: [K ‖ V] (B, L, 2·H·d) computed by the U-Net."""
        if kv is not None:
            check_unadapted("CrossAttention", self.to_k, self.to_v)
            return (self.to_q(x), *kv.chunk(2, dim=-1))
        w = self.fused_weight
        if w is not None:
            check_unadapted("CrossAttention", self.to_q, self.to_k, self.to_v)
        if w is not None and self.training:
            raise RuntimeError("CrossAttention: fused projections are for inference (stale once weights train); "
                               "call unfuse_projections() before training")
        if w is not None and self.is_self_attention and context is None:
            return F.linear(x, w).chunk(3, dim=-1)
        context = x if context is None else context
        if w is not None and not self.is_self_attention:
            return (self.to_q(x), *F.linear(context, w).chunk(2, dim=-1))
        return self.to_q(x), self.to_k(context), self.to_v(context)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2)  # (B, L, H·d) -> (B, H, L, d)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                kv: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, query_dim), context: (B, L, context_dim) or None -> (B, N, query_dim). ``kv``: the context's
        [K ‖ V] (B, L, 2·H·d) when the U-Net computed it with the other layers' (:class:`Hoisted`)."""
        q, k, v = (self._split_heads(t) for t in self._project(x, context, kv))  # (B, H, N or L, d)
        out = attention(q, k, v, backend=self.backend, upcast=self.upcast)  # (B, H, N, d)
        return self.to_out(out.transpose(1, 2).flatten(2))  # (B, N, query_dim)


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): a · GELU(g) with [a ‖ g] = proj(x)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _split_projection(self.proj):
            a, gate = split_linear(x, self.proj.weight, self.proj.bias)
        else:
            a, gate = self.proj(x).chunk(2, dim=-1)  # (B, N, dim_out) each
        return a * F.gelu(gate)


def _split_projection(proj: nn.Module) -> bool:
    """Whether GEGLU computes ``proj`` as two matmuls: compiling with gradients, a plain ``nn.Linear`` (a LoRA
    ``proj`` keeps its one call, so that its update is not bypassed)."""
    return GEGLU_SPLIT_GRAD and compiling_with_grad() and type(proj) is nn.Linear


def split_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.linear(x, weight, bias).chunk(2, -1)`` as two matmuls over the halves of ``weight``'s rows (views):
    x (..., in), weight (2·out, in) -> two (..., out)."""
    w_a, w_g = weight.chunk(2, dim=0)
    b_a, b_g = bias.chunk(2) if bias is not None else (None, None)
    return F.linear(x, w_a, b_a), F.linear(x, w_g, b_g)


class FeedForward(nn.Module):
    """``net``: GEGLU(dim → 4·dim) → Dropout → Linear(4·dim → dim) (keys ``net.0.proj``, ``net.2``)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, N, dim)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention, GEGLU feed-forward, each residual.

    With ``disable_self_attn`` the first attention also attends to the context (``attn1`` then has context-sized
    ``to_k``/``to_v``), as in SD 2's ``disable_self_attentions``.
    """

    def __init__(self, dim: int, n_heads: int, d_head: int, context_dim: int | None, dropout: float = 0.0,
                 disable_self_attn: bool = False, use_checkpoint: bool = False, backend: str = "sdpa",
                 upcast: bool = False) -> None:
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.use_checkpoint = use_checkpoint
        attn_kw = dict(heads=n_heads, dim_head=d_head, dropout=dropout, backend=backend, upcast=upcast)
        self.attn1 = CrossAttention(dim, context_dim if disable_self_attn else None, **attn_kw)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, **attn_kw)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                hoisted: Hoisted | None = None) -> torch.Tensor:
        """x: (B, N, dim), context: (B, L, context_dim) -> (B, N, dim)."""
        if hoisted is not None:  # inference only: no checkpointing
            return self._forward(x, context, hoisted.kv_for(self.attn1), hoisted.kv_for(self.attn2))
        return run_maybe_checkpointed(self.use_checkpoint, self, self._forward, x, context)

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None, kv1: torch.Tensor | None = None,
                 kv2: torch.Tensor | None = None) -> torch.Tensor:
        if self.disable_self_attn and context is not None:
            x = repeat_batch(x, context.shape[0])  # (G·B, N, dim): the context's batch from here on
        x = x + self.attn1(self.norm1(x), context if self.disable_self_attn else None, kv1)  # (B, N, dim)
        if context is not None:  # x may hold B items for G·B contexts (UNetModel's repeat): they part here
            x = repeat_batch(x, context.shape[0])  # (G·B, N, dim)
        x = x + self.attn2(self.norm2(x), context, kv2)  # (B, N, dim)
        return x + self.ff(self.norm3(x))  # (B, N, dim)


class SpatialTransformer(ContextBlock):
    """Transformer over the H·W positions of a feature map, with a residual around it.

    GroupNorm → proj_in (1×1 conv, or Linear when ``use_linear`` as in SD 2) → ``depth`` transformer blocks →
    proj_out (zero-initialised) → + x.
    """

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1, dropout: float = 0.0,
                 context_dim: int | list[int] | None = None, disable_self_attn: bool = False,
                 use_linear: bool = False, use_checkpoint: bool = False, backend: str = "sdpa",
                 upcast: bool = False) -> None:
        super().__init__()
        contexts = list(context_dim) if isinstance(context_dim, (list, tuple)) else [context_dim] * depth
        if len(contexts) != depth:
            raise ValueError(f"context_dim has {len(contexts)} entries but transformer_depth is {depth}")
        inner = n_heads * d_head
        self.in_channels, self.use_linear = in_channels, use_linear
        self.norm = GroupNorm(32, in_channels, eps=TRANSFORMER_NORM_EPS)
        self.proj_in = nn.Linear(in_channels, inner) if use_linear else Conv2d(in_channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, n_heads, d_head, contexts[d], dropout, disable_self_attn, use_checkpoint,
                                  backend, upcast)
            for d in range(depth)
        )
        # The original builds the linear proj_out as Linear(in_channels, inner); the shapes agree whenever
        # inner == in_channels, the only case in which its forward runs, so checkpoints load either way.
        out = nn.Linear(inner, in_channels) if use_linear else Conv2d(inner, in_channels, 1)
        self.proj_out = zero_module(out)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                hoisted: Hoisted | None = None) -> torch.Tensor:
        """x: (B, C, H, W), context: (B, L, context_dim) or None -> (B, C, H, W)."""
        hgt, wid = x.shape[-2:]
        h = self.norm(x)  # (B, C, H, W)
        if not self.use_linear:
            h = self.proj_in(h)  # (B, inner, H, W)
        h = h.flatten(2).transpose(1, 2)  # (B, H·W, inner or C)
        if self.use_linear:
            h = self.proj_in(h)  # (B, H·W, inner)
        for block in self.transformer_blocks:
            h = block(h, context, hoisted)  # (B, H·W, inner)
        if self.use_linear:
            h = self.proj_out(h)  # (B, H·W, C)
        h = h.transpose(1, 2).reshape(-1, h.shape[2], hgt, wid)  # (B, inner or C, H, W)
        if not self.use_linear:
            h = self.proj_out(h)  # (B, C, H, W)
        if x.is_contiguous() and not h.is_contiguous():  # the linear path's view has NHWC strides: NCHW stays NCHW
            h = h.contiguous()
        return film(h, x)  # h + x, x repeated to h's batch when the context's batch is G·B (UNetModel's repeat)
