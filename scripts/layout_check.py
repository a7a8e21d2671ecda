#!/usr/bin/env python
"""Which ``convolution_backward`` calls of a compiled U-Net training step get their gradient in another layout than
their input: each one is a copy inside cuDNN's backward (``grad_output.to(input.suggest_memory_format())``), the
``_to_copy`` rows of the training profiles. Runs on the CPU too (inductor's C++ backend), where it reproduces the
GPU image's torch 2.11 behaviour: docs/BENCHMARKS.md, 2026-12-05, sixth session.

    python scripts/layout_check.py                              # SD-1.5's layout at 64 channels, 16x16 latents, CPU
    python scripts/layout_check.py --fp32-norms --out check.jsonl   # GroupNorm in fp32 as CUDA autocast runs it
    python scripts/layout_check.py --device cuda --channels 320 --latent 64 --batch 8   # the real shapes on a GPU

The U-Net has SD-1.5's structure (4 levels, 2 ResBlocks each, transformers at the first three, channels_last) with
``--channels`` base channels; the step is bf16 autocast, the forward compiled, the loss outside the graph as
``train.compile`` does. One row: the number of calls, how many convert, and the converting ones with their strides.
About 6 minutes on a 2-core CPU (the compile).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import describe_run, emit  # noqa: E402
from bench_profile import conv_backward_layouts  # noqa: E402

from ldm.unet.model import UNetModel  # noqa: E402


@contextlib.contextmanager
def fp32_group_norm(device: str) -> Iterator[None]:
    """Inside the block F.group_norm runs in fp32 under ``device``'s autocast, as CUDA autocast's fp32 policy does
    (CPU autocast runs it in bf16), so that a CPU run traces CUDA's casts around the norms; restored after."""
    stock = F.group_norm

    def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
        if not torch.is_autocast_enabled(device):
            return stock(x, num_groups, weight, bias, eps)
        with torch.autocast(device, enabled=False):
            f32 = [t.float() if t is not None else None for t in (x, weight, bias)]
            return stock(f32[0], num_groups, f32[1], f32[2], eps)

    F.group_norm = group_norm
    try:
        yield
    finally:
        F.group_norm = stock


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--channels", type=int, default=64, help="base channels (SD-1.5: 320); a multiple of 32")
    p.add_argument("--latent", type=int, default=16, help="latent side, a multiple of 8")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--fp32-norms", action="store_true", help="GroupNorm in fp32 under autocast (CUDA's policy)")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    if a.channels % 32 or a.latent % 8:
        p.error(f"--channels must be a multiple of 32 and --latent of 8, got {a.channels} and {a.latent}")
    describe_run("scripts/layout_check.py", argv)
    dev = torch.device(a.device)
    with fp32_group_norm(dev.type) if a.fp32_norms else contextlib.nullcontext():
        emit(a.out, what="layout_check_conv_backward", fp32_norms=a.fp32_norms, channels=a.channels,
             latent=a.latent, batch=a.batch, **check(dev, a.channels, a.latent, a.batch))
    return 0


def check(dev: torch.device, channels: int, latent: int, batch: int) -> dict:
    """The compiled step's convolution_backward calls: the first step's seconds, the count, the converting ones."""
    torch.manual_seed(0)
    net = UNetModel(in_channels=4, out_channels=4, model_channels=channels, attention_resolutions=[4, 2, 1],
                    num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                    context_dim=64).to(dev, memory_format=torch.channels_last)
    x = torch.randn(batch, 4, latent, latent, device=dev).to(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (batch,), device=dev)
    ctx = torch.randn(batch, 77, 64, device=dev)
    fwd = torch.compile(net, dynamic=False)

    def loss() -> torch.Tensor:
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            pred = fwd(x, t, context=ctx)  # (B, 4, h, w)
        return (pred.float() - torch.randn_like(pred, dtype=torch.float32)).square().mean()

    t0 = time.time()
    loss().backward()
    net.zero_grad(set_to_none=True)
    first_step_s = round(time.time() - t0, 1)
    rows = conv_backward_layouts(loss)
    return {"first_step_s": first_step_s, "calls": sum(r["calls"] for r in rows),
            "converting": sum(r["calls"] for r in rows if r["converts"]),
            "converting_calls": [r for r in rows if r["converts"]]}


if __name__ == "__main__":
    sys.exit(main())
