"""The Triton GroupNorm (ldm.kernels.group_norm: one program per group, or the statistics in parts and then the
normalization) against inductor's lowering of the same norm (ldm.norm.group_norm_nhwc compiled, three kernels), at
every GroupNorm shape of SD-1.5's U-Net in a CFG step.

    python scripts/bench_group_norm.py --out gn.jsonl            # each shape: both methods, a tile sweep, inductor
    python scripts/bench_group_norm.py --batch 16 --silu-only

Times are µs per norm from CUDA-graph replays of 20 back-to-back calls (``graph_time_us``), as the norms run inside
the step's graph. Each row also gives the largest difference of either output from an fp32 reference.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import describe_run, emit, graph_time_us  # noqa: E402

# (channels, side) of SD-1.5's GroupNorms at 64×64 latents: the encoder levels, and the decoder's concatenations
SHAPES = ((320, 64), (640, 64), (960, 64), (640, 32), (960, 32), (1280, 32), (1920, 32), (1280, 16),
          (1920, 16), (2560, 16), (1280, 8), (2560, 8))
SPLIT_TILES = (2048, 4096, 8192)  # values per tile of the two-kernel method
SPLIT_PROGRAMS = (264, 528)  # programs of its statistics kernel
GROUPS = 32


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, silu: bool) -> torch.Tensor:
    y = F.group_norm(x.float(), GROUPS, w.float(), b.float(), 1e-5)
    return F.silu(y) if silu else y


def bench_shape(out: Path | None, batch: int, c: int, side: int, silu: bool, sweep: bool) -> None:
    from ldm.kernels import group_norm as kg
    from ldm.norm import group_norm_nhwc

    x = (torch.randn(batch, c, side, side, device="cuda") * 2 + 1).half().contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(c, device="cuda").half(), torch.randn(c, device="cuda").half()
    ref = reference(x, w, b, silu)
    y = torch.empty_like(x)
    shape = dict(batch=batch, channels=c, side=side, silu=silu)
    cg = c // GROUPS
    method = "single" if side * side <= kg.SINGLE_MAX_ROWS else "split"
    runs = {("single", kg.pick_config(side * side, cg)), ("split", kg.SPLIT_DEFAULT)}
    if sweep:
        runs |= {("split", (t, p, nw)) for t in SPLIT_TILES for p in SPLIT_PROGRAMS for nw in (4, 8)}
    for m, cfg in sorted(runs):
        def call(m=m, cfg=cfg):
            kg.launch(x, w, b, y, GROUPS, 1e-5, silu, config=cfg, method=m)

        call()
        err = (y.float() - ref).abs().max().item()
        default = m == method and cfg in (kg.SPLIT_DEFAULT, kg.pick_config(side * side, cg))
        emit(out, what="group_norm_us", impl="triton", method=m, config=list(cfg), default=default,
             value=graph_time_us(call), max_abs_diff=err, **shape)

    def inductor(x):
        y = group_norm_nhwc(x, GROUPS, w, b, 1e-5)
        return F.silu(y) if silu else y

    compiled = torch.compile(inductor, dynamic=False, options={"split_reductions": False})
    with torch.no_grad():
        err = (compiled(x).float() - ref).abs().max().item()
        emit(out, what="group_norm_us", impl="inductor", value=graph_time_us(lambda: compiled(x)),
             max_abs_diff=err, **shape)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2, help="the U-Net's batch (2: one CFG step at batch 1)")
    p.add_argument("--silu-only", action="store_true", help="only the norms followed by SiLU (the ResBlocks')")
    p.add_argument("--no-sweep", action="store_true", help="the kernel's default tile only")
    p.add_argument("--out", type=Path, help="append the JSON rows to this file")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_group_norm.py times CUDA kernels: no GPU here")
    describe_run("scripts/bench_group_norm.py", argv)
    torch._dynamo.config.recompile_limit = 64  # one graph per shape of the same function
    torch.manual_seed(0)
    for c, side in SHAPES:
        for silu in (True,) if args.silu_only else (True, False):
            bench_shape(args.out, args.batch, c, side, silu, not args.no_sweep)


if __name__ == "__main__":
    main()
