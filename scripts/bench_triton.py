#!/usr/bin/env python
"""ldm's Triton kernels (``ldm.kernels``) against what the compiled U-Net runs without them, at SD-1.5's shapes.

    python scripts/bench_triton.py                  # the CFG step's shapes (batch 2), every tile tried
    python scripts/bench_triton.py --batch 16       # txt2img at batch 8
    python scripts/bench_triton.py --out k.jsonl

- GEGLU (``ldm.kernels.geglu``): ``F.linear`` + chunk + a·GELU(g) compiled by inductor (a cuBLAS matmul that
  writes [a ‖ g] and a Triton pointwise kernel), against the fused kernel in each tile of :data:`GEGLU_TILES`.
- Cross-attention over the 77 text tokens (``ldm.kernels.short_attention``): SDPA (torch's choice: cuDNN on an
  H200), FlashAttention-2, the memory-efficient kernel, and inductor's compiled math, against the one-tile kernel
  in each of :data:`ATTENTION_TILES`; q, k and v are strided views of the projections, as in the U-Net.

µs per call: the median over replays of a CUDA graph of 20 back-to-back calls. ``max_abs_err``: against an fp32
reference, next to the reference path's own fp16 error.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_common import describe_run, emit, graph_time_us, summary  # noqa: E402

# SD-1.5 per U-Net level: (channels, tokens per image at 64×64 latents, head width d); 8 heads
LEVELS = ((320, 4096, 40), (640, 1024, 80), (1280, 256, 160))
TEXT_TOKENS = 77
# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)
GEGLU_TILES = [(128, 64, 64, 8, 4, 4), (128, 64, 64, 8, 8, 4), (128, 128, 64, 8, 8, 3), (64, 64, 64, 8, 4, 4),
               (128, 64, 32, 8, 4, 5), (64, 128, 64, 8, 4, 4), (128, 32, 64, 8, 4, 4), (64, 64, 128, 8, 4, 3),
               (256, 64, 64, 8, 8, 3), (128, 64, 128, 8, 8, 3), (256, 64, 32, 8, 8, 4), (256, 64, 64, 8, 8, 2),
               (128, 128, 32, 8, 8, 4), (128, 128, 64, 8, 8, 4), (256, 64, 64, 4, 8, 3), (256, 32, 64, 8, 8, 3),
               (128, 64, 64, 8, 8, 3), (256, 128, 32, 8, 8, 3)]
ATTENTION_TILES = [(32, 4, 1), (64, 4, 1), (128, 4, 1), (128, 8, 1), (64, 4, 2), (128, 8, 2), (16, 4, 1)]


def best_of(tiles, run) -> tuple[float, object, dict]:
    """(µs, tile, all) for the fastest tile; a tile that fails to compile or launch is skipped and said."""
    times = {}
    for tile in tiles:
        try:
            times[tile] = graph_time_us(lambda: run(tile))
        except Exception as e:  # out of shared memory, registers: the tile does not fit this card
            print(f"tile {tile}: {type(e).__name__}: {str(e).splitlines()[0][:160]}", file=sys.stderr)
    if not times:
        raise RuntimeError("no tile ran")
    tile = min(times, key=times.get)
    return times[tile], tile, {str(t): round(v, 2) for t, v in times.items()}


def bench_geglu(c: int, tokens: int, out) -> None:
    from ldm.kernels import geglu as kg

    m, k, n = tokens, c, 4 * c
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    w = torch.randn(2 * n, k, device="cuda", dtype=torch.float16) / k**0.5
    b = torch.randn(2 * n, device="cuda", dtype=torch.float16) * 0.1
    ref_fn = torch.compile(lambda x: (lambda a, g: a * F.gelu(g))(*F.linear(x, w, b).chunk(2, dim=-1)))
    y = torch.empty(m, n, device="cuda", dtype=torch.float16)
    fused_us, tile, tiles = best_of(GEGLU_TILES, lambda t: kg.launch(x, w, b, y, config=t))
    a32, g32 = F.linear(x.float(), w.float(), b.float()).chunk(2, dim=-1)
    exact = a32 * F.gelu(g32)
    kg.launch(x, w, b, y, config=tile)
    emit(out, what="kernel_geglu", m=m, k=k, n=n, unfused_us=round(graph_time_us(lambda: ref_fn(x)), 2),
         fused_us=round(fused_us, 2), tile=list(tile), tiles=tiles,
         max_abs_err=float((y.float() - exact).abs().max()),
         unfused_max_abs_err=float((ref_fn(x).float() - exact).abs().max()), out_abs_max=float(exact.abs().max()))


def bench_cross_attention(c: int, tokens: int, d: int, batch: int, out) -> None:
    from ldm.kernels import short_attention as ka

    heads = c // d
    qf = torch.randn(batch, tokens, c, device="cuda", dtype=torch.float16)
    kv = torch.randn(batch, TEXT_TOKENS, 2 * c, device="cuda", dtype=torch.float16)
    q = qf.unflatten(-1, (heads, d)).transpose(1, 2)  # (B, H, N, d) views, as the U-Net makes them
    k, v = (t.unflatten(-1, (heads, d)).transpose(1, 2) for t in kv.chunk(2, dim=-1))
    row = {}
    for name, backend in (("sdpa", None), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def call(backend=backend):
            if backend is None:
                return F.scaled_dot_product_attention(q, k, v)
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)
        try:
            row[f"{name}_us"] = round(graph_time_us(call), 2)
        except RuntimeError as e:
            print(f"{name}: {str(e).splitlines()[0][:160]}", file=sys.stderr)
    math_fn = torch.compile(lambda q, k, v: ((q @ k.transpose(-1, -2)) * d**-0.5).softmax(-1) @ v)
    row["compiled_math_us"] = round(graph_time_us(lambda: math_fn(q, k, v)), 2)
    o = torch.empty(batch, tokens, heads, d, device="cuda", dtype=torch.float16).transpose(1, 2)
    fused_us, tile, tiles = best_of(ATTENTION_TILES, lambda t: ka.launch(q, k, v, o, config=t))
    ka.launch(q, k, v, o, config=tile)
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    sdpa_err = float((F.scaled_dot_product_attention(q, k, v).float() - exact).abs().max())
    emit(out, what="kernel_cross_attention", batch=batch, heads=heads, lq=tokens, lk=TEXT_TOKENS, d=d, **row,
         triton_us=round(fused_us, 2), tile=list(tile), tiles=tiles,
         max_abs_err=float((o.float() - exact).abs().max()), sdpa_max_abs_err=sdpa_err)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2, help="U-Net batch (CFG: twice the images), default 2")
    p.add_argument("--only", default="geglu,attention", help="comma-separated: geglu, attention")
    p.add_argument("--label", default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    describe_run("scripts/bench_triton.py", argv, a.label)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU (the kernels are Triton)")
    out = Path(a.out) if a.out else None
    parts = set(a.only.split(","))
    torch.manual_seed(0)
    for c, tokens, d in LEVELS:
        if "geglu" in parts:
            bench_geglu(c, a.batch * tokens, out)
        if "attention" in parts:
            bench_cross_attention(c, tokens, d, a.batch, out)
    summary()
    return 0


if __name__ == "__main__":
    sys.exit(main())
