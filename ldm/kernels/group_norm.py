"""GroupNorm (Wu & He 2018), optionally followed by SiLU, of a channels_last activation in Triton.

y = act((x - μ_bg) / sqrt(σ²_bg + eps) · γ_c + β_c), μ and σ² over the H·W·C/G values of sample b's group g. The
sums are of d = x - K_g (K_g the group's first value, so no cancellation unless the group's spread is far below its
distance from K_g), in fp32 per lane until the end.

Two methods (:func:`launch`):
- "single": one program per (b, g) walks the group's H·W rows twice in tiles of (BLOCK_L rows × the group's
  channels), the sums in the first pass, the normalization in the second. One launch, but only B·G programs, each
  reading its group 20-80 bytes a row at the row stride: on an H100 it lost to inductor from 16×16 maps up (at
  64×64, 24-48 µs against 12.5), so it serves the small maps (:data:`SINGLE_MAX_ROWS`).
- "split": S programs per sample sum every group over a run of rows (coalesced: a tile holds whole rows of C
  channels) into a (B, S, 2, G) buffer; then each program of the normalization adds up its sample's S parts and
  normalizes a tile of rows. Two launches where inductor's lowering of :func:`ldm.norm.group_norm_nhwc` takes three
  (the statistics, μ and 1/σ per group, the normalization).
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


@triton.jit
def _partial_stats_kernel(x_ptr, p_ptr, L, G, CG, S, rows_per, sxb, sxl,
                          BLOCK_L: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr):
    """Program (b, s): Σ d and Σ d² (d = x - K_g) of every group over rows [s·rows_per, (s+1)·rows_per) of sample
    b, into p[b, s, 0 or 1, g]."""
    pid = tl.program_id(0)  # b · S + s
    b = pid // S
    s = pid % S
    rg = tl.arange(0, BLOCK_G)
    rc = tl.arange(0, BLOCK_CG)
    gc_ok = (rg < G)[:, None] & (rc < CG)[None, :]  # (BLOCK_G, BLOCK_CG)
    gc = rg[:, None] * CG + rc[None, :]  # channel of (g, c)
    xb = x_ptr + b * sxb
    k = tl.load(xb + rg * CG, mask=rg < G, other=0.0).to(tl.float32)  # (BLOCK_G,): the shifts K_g
    s1 = tl.zeros((BLOCK_L, BLOCK_G, BLOCK_CG), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_L, BLOCK_G, BLOCK_CG), dtype=tl.float32)
    end = tl.minimum((s + 1) * rows_per, L)
    for l0 in range(s * rows_per, end, BLOCK_L):
        rl = l0 + tl.arange(0, BLOCK_L)
        ok = (rl < end)[:, None, None] & gc_ok[None, :, :]
        v = tl.load(xb + rl[:, None, None] * sxl + gc[None, :, :], mask=ok, other=0.0).to(tl.float32)
        d = tl.where(ok, v - k[None, :, None], 0.0)
        s1 += d
        s2 += d * d
    pb = p_ptr + (pid * 2) * BLOCK_G + rg
    tl.store(pb, tl.sum(tl.sum(s1, axis=2), axis=0))
    tl.store(pb + BLOCK_G, tl.sum(tl.sum(s2, axis=2), axis=0))


@triton.jit
def _normalize_kernel(x_ptr, p_ptr, w_ptr, b_ptr, y_ptr, L, G, CG, S, sxb, sxl, syb, syl, eps, inv_count,
                      HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
                      BLOCK_L: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_S: tl.constexpr):
    """Program (b, t): μ and 1/σ of every group from sample b's S partial sums, then rows [t·BLOCK_L, ...) of b
    normalized (γ, β, SiLU) into y."""
    n_tiles = tl.cdiv(L, BLOCK_L)
    pid = tl.program_id(0)  # b · n_tiles + t
    b = pid // n_tiles
    rg = tl.arange(0, BLOCK_G)
    rc = tl.arange(0, BLOCK_CG)
    rs = tl.arange(0, BLOCK_S)
    g_ok = rg < G
    pb = p_ptr + (b * S + rs[:, None]) * 2 * BLOCK_G + rg[None, :]  # (BLOCK_S, BLOCK_G)
    s_ok = (rs < S)[:, None]
    m1 = tl.sum(tl.load(pb, mask=s_ok, other=0.0), axis=0) * inv_count  # (BLOCK_G,): E[x - K]
    m2 = tl.sum(tl.load(pb + BLOCK_G, mask=s_ok, other=0.0), axis=0) * inv_count  # E[(x - K)²]
    xb = x_ptr + b * sxb
    k = tl.load(xb + rg * CG, mask=g_ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.maximum(m2 - m1 * m1, 0.0) + eps)
    mean = k + m1
    gc_ok = g_ok[:, None] & (rc < CG)[None, :]  # (BLOCK_G, BLOCK_CG)
    gc = rg[:, None] * CG + rc[None, :]
    scale = tl.zeros((BLOCK_G, BLOCK_CG), dtype=tl.float32) + rstd[:, None]  # γ_c / σ_g
    if HAS_W:
        scale = scale * tl.load(w_ptr + gc, mask=gc_ok, other=0.0).to(tl.float32)
    shift = -mean[:, None] * scale  # β_c - μ_g γ_c / σ_g
    if HAS_B:
        shift += tl.load(b_ptr + gc, mask=gc_ok, other=0.0).to(tl.float32)
    rl = (pid % n_tiles) * BLOCK_L + tl.arange(0, BLOCK_L)
    ok = (rl < L)[:, None, None] & gc_ok[None, :, :]
    v = tl.load(xb + rl[:, None, None] * sxl + gc[None, :, :], mask=ok, other=0.0).to(tl.float32)
    y = v * scale[None, :, :] + shift[None, :, :]
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(y_ptr + b * syb + rl[:, None, None] * syl + gc[None, :, :], y.to(y_ptr.dtype.element_ty), mask=ok)


def pick_config(rows: int, group_channels: int) -> Config:
    """(BLOCK_L, num_warps) of the one-program-per-group kernel for a group of ``rows`` (H·W) × ``group_channels``
    (C/G) values: tiles of about :data:`TILE` values, 4 warps."""
    block_c = triton.next_power_of_2(group_channels)
    return max(1, min(triton.next_power_of_2(rows), TILE // block_c)), 4


SplitConfig = tuple[int, int, int]  # (values per tile, programs of the statistics kernel in all, num_warps)
SPLIT_DEFAULT: SplitConfig = (4096, 264, 8)
SINGLE_MAX_ROWS = 64  # up to this many rows (8×8 maps) one program per group, above it the two kernels


def split_plan(batch: int, rows: int, groups: int, group_channels: int, config: SplitConfig) -> dict[str, int]:
    """The two kernels' blocks: the (G, C/G) lanes of a row padded to powers of two, BLOCK_L rows per tile, and the
    statistics' S programs per sample, each over ``rows_per`` rows (a multiple of BLOCK_L)."""
    tile, programs, _ = config
    block_g, block_cg = triton.next_power_of_2(groups), triton.next_power_of_2(group_channels)
    block_l = max(1, min(triton.next_power_of_2(rows), tile // (block_g * block_cg)))
    parts = max(1, min(triton.cdiv(rows, block_l), programs // batch))
    rows_per = triton.cdiv(triton.cdiv(rows, parts), block_l) * block_l
    return dict(BLOCK_G=block_g, BLOCK_CG=block_cg, BLOCK_L=block_l, S=triton.cdiv(rows, rows_per),
                rows_per=rows_per)


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
           num_groups: int, eps: float, silu: bool, config: Config | SplitConfig | None = None,
           method: str | None = None, wrap=lambda kernel: kernel) -> None:
    """Run the kernels: x, y (B, C, H, W), both channels_last (:func:`rows_stride`); weight, bias (C,) or None.
    ``method``: "single" (one program per group) or "split" (statistics in parts, then the normalization); None
    picks by the rows (:data:`SINGLE_MAX_ROWS`). ``config``: the method's (:func:`pick_config`,
    :data:`SPLIT_DEFAULT`)."""
    b, c, h, w = x.shape
    cg = c // num_groups
    sxl, syl = rows_stride(x), rows_stride(y)
    if sxl is None or syl is None:
        raise ValueError(f"ldm group_norm kernel: x and y must be channels_last, got strides {x.stride()} and "
                         f"{y.stride()} for shape {tuple(x.shape)}")
    method = method or ("single" if h * w <= SINGLE_MAX_ROWS else "split")
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu)
    w_arg, b_arg = x if weight is None else weight, x if bias is None else bias
    if method == "single":
        block_l, warps = config or pick_config(h * w, cg)
        wrap(_group_norm_kernel)[(b * num_groups,)](
            x, w_arg, b_arg, y, h * w, num_groups, cg, x.stride(0), sxl, y.stride(0), syl, eps, 1.0 / (h * w * cg),
            BLOCK_L=block_l, BLOCK_C=triton.next_power_of_2(cg), num_warps=warps, **flags)
        return
    config = config or SPLIT_DEFAULT
    plan = split_plan(b, h * w, num_groups, cg, config)
    blocks = dict(BLOCK_L=plan["BLOCK_L"], BLOCK_G=plan["BLOCK_G"], BLOCK_CG=plan["BLOCK_CG"])
    parts = torch.empty((b, plan["S"], 2, plan["BLOCK_G"]), device=x.device, dtype=torch.float32)
    wrap(_partial_stats_kernel)[(b * plan["S"],)](
        x, parts, h * w, num_groups, cg, plan["S"], plan["rows_per"], x.stride(0), sxl, num_warps=config[2], **blocks)
    wrap(_normalize_kernel)[(b * triton.cdiv(h * w, plan["BLOCK_L"]),)](
        x, parts, w_arg, b_arg, y, h * w, num_groups, cg, plan["S"], x.stride(0), sxl, y.stride(0), syl, eps,
        1.0 / (h * w * cg), BLOCK_S=triton.next_power_of_2(plan["S"]), num_warps=config[2], **blocks, **flags)


@triton_op("ldm::group_norm", mutates_args={})
def group_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, num_groups: int,
               eps: float, silu: bool) -> torch.Tensor:
    """GroupNorm(x) (then SiLU when ``silu``) of x (B, C, H, W); returned channels_last, in x's dtype."""
    if rows_stride(x) is None:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.empty_like(x, memory_format=torch.channels_last)
    launch(x, weight, bias, y, num_groups, eps, silu, wrap=wrap_triton)
    return y
