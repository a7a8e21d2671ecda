"""GroupNorm (Wu & He 2018), optionally followed by SiLU, of a channels_last activation as one Triton kernel.

y = act((x - μ_bg) / sqrt(σ²_bg + eps) · γ_c + β_c), μ and σ² over the H·W·C/G values of sample b's group g.

One program per (b, g) walks the group's H·W rows twice in tiles of (BLOCK_L rows × the group's channels): the
first pass sums d = x - K and d² (K the group's first value, so no cancellation unless the group's spread is far
below its distance from K; the sums stay in fp32 per lane until the end), the second pass normalizes, applies γ, β
and SiLU, and writes y in x's dtype and layout. The second pass reads the group again, from L2 at the U-Net's sizes
(a group of SD-1.5's first level is 64·64·10 values, 80 KB in fp16). Inductor's lowering of the same norm
(:func:`ldm.norm.group_norm_nhwc`) launches three kernels: the statistics, μ and 1/σ per group, the normalization.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

Config = tuple[int, int]  # (BLOCK_L rows per tile, num_warps)
TILE = 4096  # values per tile (BLOCK_L · BLOCK_C) unless the group has fewer rows


@triton.jit
def _group_norm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, L, n_groups, CG, sxb, sxl, syb, syl, eps, inv_count,
                       HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
                       BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)  # b · G + g
    b = pid // n_groups
    c0 = (pid % n_groups) * CG  # the group's first channel
    rc = tl.arange(0, BLOCK_C)
    c_ok = rc < CG
    xb = x_ptr + b * sxb + c0
    k = tl.load(xb).to(tl.float32)  # the shift K: the group's first value
    s1 = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        rl = l0 + tl.arange(0, BLOCK_L)
        ok = (rl < L)[:, None] & c_ok[None, :]
        v = tl.load(xb + rl[:, None] * sxl + rc[None, :], mask=ok, other=0.0).to(tl.float32)
        d = tl.where(ok, v - k, 0.0)
        s1 += d
        s2 += d * d
    m1 = tl.sum(tl.sum(s1, axis=1), axis=0) * inv_count  # E[x - K]
    m2 = tl.sum(tl.sum(s2, axis=1), axis=0) * inv_count  # E[(x - K)²]
    rstd = 1.0 / tl.sqrt(tl.maximum(m2 - m1 * m1, 0.0) + eps)
    mean = k + m1
    scale = tl.zeros((BLOCK_C,), dtype=tl.float32) + rstd  # (BLOCK_C,): γ_c / σ
    if HAS_W:
        scale = scale * tl.load(w_ptr + c0 + rc, mask=c_ok, other=0.0).to(tl.float32)
    shift = -mean * scale  # (BLOCK_C,): β_c - μ γ_c / σ
    if HAS_B:
        shift += tl.load(b_ptr + c0 + rc, mask=c_ok, other=0.0).to(tl.float32)
    yb = y_ptr + b * syb + c0
    for l0 in range(0, L, BLOCK_L):
        rl = l0 + tl.arange(0, BLOCK_L)
        ok = (rl < L)[:, None] & c_ok[None, :]
        v = tl.load(xb + rl[:, None] * sxl + rc[None, :], mask=ok, other=0.0).to(tl.float32)
        y = v * scale[None, :] + shift[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(yb + rl[:, None] * syl + rc[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)


def pick_config(rows: int, group_channels: int) -> Config:
    """(BLOCK_L, num_warps) for a group of ``rows`` (H·W) × ``group_channels`` (C/G) values: tiles of about
    :data:`TILE` values, 4 warps."""
    block_c = triton.next_power_of_2(group_channels)
    return max(1, min(triton.next_power_of_2(rows), TILE // block_c)), 4


def rows_stride(x: torch.Tensor) -> int | None:
    """The stride between consecutive (h, w) positions of a 4-D channels_last x (channels at stride 1, H and W
    mergeable), or None when x is not laid out so."""
    _, c, h, w = x.shape
    if x.stride(1) != 1 and c > 1:
        return None
    if h > 1 and w > 1 and x.stride(2) != w * x.stride(3):
        return None
    return x.stride(3) if w > 1 else x.stride(2)


def launch(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, y: torch.Tensor,
           num_groups: int, eps: float, silu: bool, config: Config | None = None, wrap=lambda kernel: kernel) -> None:
    """Run the kernel: x, y (B, C, H, W), both channels_last (:func:`rows_stride`); weight, bias (C,) or None."""
    b, c, h, w = x.shape
    cg = c // num_groups
    sxl, syl = rows_stride(x), rows_stride(y)
    if sxl is None or syl is None:
        raise ValueError(f"ldm group_norm kernel: x and y must be channels_last, got strides {x.stride()} and "
                         f"{y.stride()} for shape {tuple(x.shape)}")
    block_l, warps = config or pick_config(h * w, cg)
    wrap(_group_norm_kernel)[(b * num_groups,)](
        x, x if weight is None else weight, x if bias is None else bias, y, h * w, num_groups, cg,
        x.stride(0), sxl, y.stride(0), syl, eps, 1.0 / (h * w * cg),
        HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu,
        BLOCK_L=block_l, BLOCK_C=triton.next_power_of_2(cg), num_warps=warps)


@triton_op("ldm::group_norm", mutates_args={})
def group_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, num_groups: int,
               eps: float, silu: bool) -> torch.Tensor:
    """GroupNorm(x) (then SiLU when ``silu``) of x (B, C, H, W); returned channels_last, in x's dtype."""
    if rows_stride(x) is None:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.empty_like(x, memory_format=torch.channels_last)
    launch(x, weight, bias, y, num_groups, eps, silu, wrap=wrap_triton)
    return y
