"""softmax(q kᵀ/√d) v for key sequences that fit one tile (cross-attention over 77 text tokens), in Triton.

With every key in one tile, a program loads its BLOCK_M queries, all keys and values of one head, and computes
the exact softmax in one pass: no running maximum and no rescaling as in a flash kernel that walks the keys. Keys
beyond Lk and head dims beyond d are masked (zeros in the products, −∞ in the scores).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

Config = tuple[int, int, int]  # (BLOCK_M, num_warps, num_stages)
DEFAULT_CONFIG: Config = (64, 4, 1)


@triton.jit
def _short_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, Lq, Lk, H, qk_scale,
                            sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
                            D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rd = tl.arange(0, BLOCK_D)
    m_ok = rm < Lq
    n_ok = rn < Lk
    d_ok = rd < D
    q = tl.load(q_ptr + b * sqb + h * sqh + rm[:, None] * sqm + rd[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    kt = tl.load(k_ptr + b * skb + h * skh + rn[None, :] * skn + rd[:, None] * skd,
                 mask=d_ok[:, None] & n_ok[None, :], other=0.0)  # (BLOCK_D, BLOCK_N)
    s = tl.dot(q, kt) * qk_scale  # (BLOCK_M, BLOCK_N) scores in log2 units
    s = tl.where(n_ok[None, :], s, float("-inf"))
    p = tl.math.exp2(s - tl.max(s, axis=1)[:, None])
    l_i = tl.sum(p, axis=1)  # (BLOCK_M,)
    v = tl.load(v_ptr + b * svb + h * svh + rn[:, None] * svn + rd[None, :] * svd,
                mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
    o = tl.dot(p.to(v.dtype), v) / l_i[:, None]  # (BLOCK_M, BLOCK_D)
    tl.store(o_ptr + b * sob + h * soh + rm[:, None] * som + rd[None, :] * sod, o.to(o_ptr.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])


def pick_config(lq: int, lk: int, d: int) -> Config:
    """(BLOCK_M, warps, stages): the fastest measured on an H200 at SD-1.5's shapes (64 queries per program at
    d = 80, 32 at d = 160, where a program holds 256-wide rows of q and v)."""
    return (32, 4, 1) if d > 128 else DEFAULT_CONFIG


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, config: Config | None = None,
           wrap=lambda kernel: kernel) -> None:
    """q (B, H, Lq, d), k and v (B, H, Lk, d), any strides; out (B, H, Lq, d) written."""
    bsz, heads, lq, d = q.shape
    lk = k.shape[-2]
    block_m, warps, stages = config or pick_config(lq, lk, d)
    grid = (triton.cdiv(lq, block_m), bsz * heads)
    wrap(_short_attention_kernel)[grid](
        q, k, v, out, lq, lk, heads, math.log2(math.e) / math.sqrt(d),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        D=d, BLOCK_M=block_m, BLOCK_N=max(16, triton.next_power_of_2(lk)), BLOCK_D=max(16, triton.next_power_of_2(d)),
        num_warps=warps, num_stages=stages)


@triton_op("ldm::short_attention", mutates_args={})
def short_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ/√d) v. q: (B, H, Lq, d); k, v: (B, H, Lk, d), Lk ≤ 128, d ≤ 256 -> (B, Lq, H, d) memory
    returned as a (B, H, Lq, d) view, so that the heads merge back into (B, Lq, H·d) without a copy."""
    bsz, heads, lq, d = q.shape
    out = torch.empty((bsz, lq, heads, d), device=q.device, dtype=q.dtype).transpose(1, 2)  # (B, H, Lq, d)
    launch(q, k, v, out, wrap=wrap_triton)
    return out
