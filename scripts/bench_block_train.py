#!/usr/bin/env python
"""The compiled training step of two SD-1.5 ResBlocks at the first level, with the layout changes under test: where
the gradient copies inside ``convolution_backward`` come from, in a minute instead of the full U-Net's three. With
``--block ff``, a first-level transformer's feed-forward (LayerNorm, GEGLU, Linear, residual) instead.

    python scripts/bench_block_train.py                       # GPU: 320 channels, 64x64, batch 16, bf16 autocast
    TORCH_LOGS=output_code python scripts/bench_block_train.py --batch 64 --variants default --out block.jsonl \
        2> block-code.log                                     # and inductor's code of the forward and the backward
    python scripts/bench_block_train.py --cpu                 # tiny shapes on the CPU (a smoke run)
    python scripts/bench_block_train.py --block ff --batch 64 --variants default,chunk    # GEGLU's backward

Each variant (:data:`VARIANTS`: ``default``, ``nhwc``, ``chunk``) compiles a fresh copy of the same blocks (same
weights, channels_last, no compile cache) and reports the first step (the compile), the step's median time, each
``convolution_backward`` with its arguments' strides as the compiled backward passes them (``converts``: cuDNN
converts that call's incoming gradient, one of the copies in question), and on a GPU its kernels by category and the
copy-like operators with the ones that called them. The first row checks the layout ``convolution_backward`` is
traced with against the one it returns.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_candidates import CANDIDATES  # noqa: E402
from bench_common import describe_run, emit, summary, timed  # noqa: E402
from bench_profile import conv_backward_layouts, profile_step  # noqa: E402

from ldm.unet.attention import FeedForward  # noqa: E402
from ldm.unet.blocks import ResBlock  # noqa: E402

# name -> setup returning its undo: default (native_group_norm in training graphs), nhwc (ldm.norm.NHWC_TRAINING, the
# norms differentiated through group_norm_nhwc: bench.py's gn-nhwc-train), chunk (GEGLU's projection as one matmul
# and chunk, as before 12-06: bench.py's geglu-chunk)
VARIANTS: dict[str, Callable[[], Callable[[], None]]] = {
    "default": lambda: (lambda: None), "nhwc": CANDIDATES["gn-nhwc-train"][1],
    "chunk": CANDIDATES["geglu-chunk"][1]}


class Blocks(nn.Module):
    """Two ResBlocks in a row, as a U-Net level has them: x (B, C, H, W), emb (B, E) -> (B, C, H, W)."""

    def __init__(self, channels: int, emb_channels: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(channels, emb_channels, out_channels=channels) for _ in range(2))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, emb)
        return x


class FeedForwardBlock(nn.Module):
    """A transformer block's feed-forward with its pre-norm and residual: x (B, N, C) -> x + ff(norm(x)); the ``emb``
    argument is unused (the same call as :class:`Blocks`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm, self.ff = nn.LayerNorm(channels), FeedForward(channels)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return x + self.ff(self.norm(x))


def traced_grad_layouts(dev: torch.device) -> dict[str, bool]:
    """Whether ``convolution_backward`` gives a channels_last input's gradient in channels_last on ``dev``, run for
    real and traced with fake tensors (the strides a compiled backward records), for a channels_last and an NCHW
    gradient. A traced NCHW against a real channels_last would be pytorch/pytorch#171622; torch 2.11's and 2.14's
    fake rules both trace channels_last (fake CUDA tensors on the CPU, docs/BENCHMARKS.md, 12-05 sixth session)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def layouts(make) -> dict[str, bool]:
        x = make(2, 64, 8, 8).to(memory_format=torch.channels_last)
        w = make(64, 64, 3, 3).to(memory_format=torch.channels_last)
        found = {}
        grads = {"grad_cl": make(2, 64, 8, 8).to(memory_format=torch.channels_last), "grad_nchw": make(2, 64, 8, 8)}
        for name, g in grads.items():
            gi = torch.ops.aten.convolution_backward(g, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                                     [True, True, False])[0]
            found[name] = gi.is_contiguous(memory_format=torch.channels_last)
        return found

    real = layouts(lambda *shape: torch.randn(*shape, device=dev))
    with FakeTensorMode():
        fake = layouts(lambda *shape: torch.empty(*shape, device=dev))
    return {f"real_{k}": v for k, v in real.items()} | {f"traced_{k}": v for k, v in fake.items()}


def run_variant(name: str, model: nn.Module, x: torch.Tensor, emb: torch.Tensor, out, dtype: torch.dtype,
                block: str = "resblocks") -> None:
    undo = VARIANTS[name]()
    try:
        time_variant(name, model, x, emb, out, dtype, block)
    finally:
        undo()


def time_variant(name: str, model: nn.Module, x: torch.Tensor, emb: torch.Tensor, out, dtype: torch.dtype,
                 block: str = "resblocks") -> None:
    net = copy.deepcopy(model)
    fwd = torch.compile(net, dynamic=False)
    dev = x.device

    def loss() -> torch.Tensor:
        with torch.autocast(dev.type, dtype=dtype):
            y = fwd(x, emb)
        return y.float().square().mean()

    def step() -> None:
        loss().backward()
        net.zero_grad(set_to_none=True)

    torch._dynamo.reset()
    t0 = time.time()
    step()
    torch.cuda.synchronize() if dev.type == "cuda" else None
    emit(out, what="block_train_first_step_s", variant=name, block=block, value=time.time() - t0)
    emit(out, what="block_train_step", variant=name, block=block, **timed(step, 3, 10))
    layouts = conv_backward_layouts(loss)
    net.zero_grad(set_to_none=True)
    emit(out, what="block_train_conv_backward_layouts", variant=name, block=block, calls=layouts,
         converting=sum(r["calls"] for r in layouts if r["converts"]))
    if dev.type == "cuda":
        copies: list = []
        total, cats, top = profile_step(step, 5, ops=copies)
        emit(out, what="block_train_profile", variant=name, block=block, total_ms_per_step=total, by_category_ms=cats,
             kernels=top[:20], copy_ops=copies)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--variants", default="default,nhwc", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--block", choices=("resblocks", "ff"), default="resblocks",
                   help="two ResBlocks (default) or a transformer's feed-forward over the level's tokens")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    names = [v for v in a.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        p.error(f"--variants: unknown {unknown or a.variants!r}; choose from {', '.join(VARIANTS)}")
    if not a.cpu and not torch.cuda.is_available():
        p.error("no CUDA device: pass --cpu for the tiny smoke run")
    describe_run("scripts/bench_block_train.py", argv)
    dev = torch.device("cpu" if a.cpu else "cuda")
    c, e, side = (32, 64, 8) if a.cpu else (320, 1280, 64)  # SD-1.5's first level: 320 channels at 64x64 latents
    torch.manual_seed(0)
    if a.block == "ff":
        model = FeedForwardBlock(c).to(dev)
        x = torch.randn(a.batch, side * side, c, device=dev).requires_grad_()  # (B, H·W, C): the level's tokens
    else:
        model = Blocks(c, e).to(dev, memory_format=torch.channels_last)
        x = torch.randn(a.batch, c, side, side, device=dev).to(memory_format=torch.channels_last).requires_grad_()
    emb = torch.randn(a.batch, e, device=dev)
    emit(a.out, what="conv_backward_grad_input_channels_last", **traced_grad_layouts(dev))
    # Each variant compiles from scratch, so that the first step is the compile and the output code is logged.
    caches = torch._functorch.config.enable_autograd_cache, torch._inductor.config.fx_graph_cache
    torch._functorch.config.enable_autograd_cache = torch._inductor.config.fx_graph_cache = False
    try:
        for name in names:
            run_variant(name, model, x, emb, a.out, torch.bfloat16, a.block)
    finally:
        torch._functorch.config.enable_autograd_cache, torch._inductor.config.fx_graph_cache = caches
    summary()
    return 0


if __name__ == "__main__":
    sys.exit(main())
