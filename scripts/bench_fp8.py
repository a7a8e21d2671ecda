#!/usr/bin/env python
"""Would fp8 matmuls (Hopper's e4m3 tensor cores) speed up the U-Net's linear layers? Issue 7 names them as an option.

    python scripts/bench_fp8.py                 # SD-1.5's transformer linears at the CFG step's token counts
    python scripts/bench_fp8.py --batch 16      # txt2img at batch 8 (CFG doubles it)
    python scripts/bench_fp8.py --out fp8.jsonl

For each linear of SD-1.5's transformer blocks (q/k/v fused, out, GEGLU in, FF out; proj_in/out as matmuls) at the
token count of each U-Net level, in fp16, channels_last activations flattened to (tokens, channels):

- ``fp16_us``: ``F.linear`` (cuBLAS), and ``fp8_us``: ``torch._scaled_mm`` on operands quantized beforehand, per-row
  scales: the kernels alone, the best case for fp8;
- ``fp16_fused_us`` and ``fp8_fused_us``: compiled, with the epilogue the U-Net puts after the matmul (GELU), and for
  fp8 the dynamic per-token quantization of the activation (amax, scale, cast) that an fp8 layer must do at run time:
  what a layer would cost in the step;
- ``fp8_rel_err``: ‖y_fp8 − y‖ / ‖y‖ against an fp32 reference (random normal operands).

Each time is the median over repetitions of a CUDA graph of 20 back-to-back calls (no launch latency), per call.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import describe_run, emit, graph_time_us, summary  # noqa: E402

E4M3 = torch.float8_e4m3fn

# (channels, tokens at batch 1 and 64×64 latents) per U-Net level of SD-1.5; each level's linears in (K, N)
LEVELS = ((320, 4096), (640, 1024), (1280, 256))


def level_linears(c: int) -> list[tuple[str, int, int]]:
    return [("qkv", c, 3 * c), ("proj_or_out", c, c), ("geglu_in", c, 8 * c), ("ff_out", 4 * c, c)]


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t (R, K) -> (t / s in e4m3, s (R, 1) fp32), s = amax over each row / 448: per-row (per-token or per-output-
    channel) scaling, the finest torch._scaled_mm takes."""
    s = t.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / torch.finfo(E4M3).max
    return (t.float() / s).to(E4M3), s


def fp8_linear(x: torch.Tensor, w8: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
    """x (M, K) fp16 @ w8ᵀ with w8 (N, K) e4m3 and its scales sw (1, N): quantizes x per token, returns (M, N) in
    x's dtype (bf16 accumulation output, the type rowwise-scaled fp8 matmuls give on Hopper)."""
    x8, sx = quantize_rows(x)
    return torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16).to(x.dtype)


def bench_linear(name: str, m: int, k: int, n: int, out) -> dict:
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    w = torch.randn(n, k, device="cuda", dtype=torch.float16) / k**0.5
    w8, sw_col = quantize_rows(w)
    sw = sw_col.t().contiguous()  # (1, N)
    x8, sx = quantize_rows(x)
    fused16 = torch.compile(lambda x: F.gelu(F.linear(x, w)))
    fused8 = torch.compile(lambda x: F.gelu(fp8_linear(x, w8, sw)))
    row = {
        "fp16_us": graph_time_us(lambda: F.linear(x, w)),
        "fp8_us": graph_time_us(lambda: torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw,
                                                         out_dtype=torch.bfloat16)),
        "fp16_fused_us": graph_time_us(lambda: fused16(x)),
        "fp8_fused_us": graph_time_us(lambda: fused8(x)),
    }
    ref = F.linear(x.float(), w.float())
    err = float((fp8_linear(x, w8, sw).float() - ref).norm() / ref.norm())
    row = {k: round(v, 2) for k, v in row.items()}
    emit(out, what="fp8_linear", layer=name, m=m, k=k, n=n, gflop=2 * m * k * n / 1e9, fp8_rel_err=err, **row)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2, help="U-Net batch (CFG: twice the images), default 2")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    describe_run("scripts/bench_fp8.py", argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        p.error("needs a GPU with fp8 tensor cores (compute capability 8.9 or newer)")
    out = Path(a.out) if a.out else None
    totals = {"fp16_us": 0.0, "fp8_us": 0.0, "fp16_fused_us": 0.0, "fp8_fused_us": 0.0}
    for c, tokens in LEVELS:
        for name, k, n in level_linears(c):
            row = bench_linear(name, a.batch * tokens, k, n, out)
            for key in totals:
                totals[key] += row[key]
    emit(out, what="fp8_linear_sum_one_of_each", batch=a.batch, **{k: round(v, 2) for k, v in totals.items()})
    summary()
    return 0


if __name__ == "__main__":
    sys.exit(main())
