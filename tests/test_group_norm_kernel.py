"""The one-kernel Triton GroupNorm (ldm.kernels.group_norm): it computes what torch computes (on the CPU through
Triton's interpreter, on a GPU compiled and inside the compiled U-Net), NormActSequential hands the SiLU to it, and
the library uses it only where its rules say."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from ldm import kernels, norm
from ldm.norm import GroupNorm, NormActSequential
from test_unet import TINY_V1, build, inputs

ROOT = Path(__file__).resolve().parents[1]

# Odd sizes on purpose: rows not a multiple of the tile, C/G not a power of two, a 1-row map, no affine; an offset
# mean (5) that unshifted sums would lose digits to; a tile of 4 rows that the loop walks many times.
INTERPRETED = textwrap.dedent("""
    import torch, torch.nn.functional as F
    from ldm.kernels import group_norm as kg
    torch.manual_seed(0)
    cases = ((2, 40, 5, 7, 4, True, True), (1, 24, 3, 3, 8, False, True), (2, 12, 4, 4, 3, True, False),
             (1, 64, 1, 6, 32, False, True), (2, 96, 9, 11, 32, True, True))
    methods = (("single", (8, 4)), ("single", None), ("split", (64, 5, 4)), ("split", None), (None, None))
    for method, cfg in methods:  # split (64, 5, 4): 5 statistics programs over 2 samples, so parts of 2 tiles
        for b, c, h, w, g, silu, affine in cases:
            x = (torch.randn(b, c, h, w) * 3 + 5).contiguous(memory_format=torch.channels_last)
            wt, bs = (torch.randn(c), torch.randn(c)) if affine else (None, None)
            y = torch.full_like(x, float("nan"))
            kg.launch(x, wt, bs, y, g, 1e-5, silu, config=cfg, method=method)
            ref = F.group_norm(x, g, wt, bs, 1e-5)
            torch.testing.assert_close(y, F.silu(ref) if silu else ref, atol=1e-5, rtol=1e-5)
    try:
        kg.launch(torch.randn(1, 8, 2, 2), None, None, torch.empty(1, 8, 2, 2), 4, 1e-5, False)
    except ValueError as e:
        assert "channels_last" in str(e), e
    else:
        raise AssertionError("an NCHW input was taken")
    print("ok")
""")


def test_the_kernel_computes_group_norm_and_silu_in_triton_s_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_rows_stride_takes_channels_last_maps_only():
    from ldm.kernels.group_norm import rows_stride

    x = torch.empty(2, 8, 4, 6)
    assert rows_stride(x.contiguous(memory_format=torch.channels_last)) == 8
    assert rows_stride(x) is None  # NCHW
    assert rows_stride(x.contiguous(memory_format=torch.channels_last)[:, :, :, :3]) is None  # H, W not mergeable
    assert rows_stride(torch.empty(1, 8, 1, 1)) is not None  # one row: its stride is never used


def test_the_blocks_tile_about_tile_values_and_cover_every_row():
    from ldm.kernels.group_norm import TILE, pick_config, split_plan

    assert pick_config(4096, 10) == (TILE // 16, 4)  # SD-1.5's first level: C/G = 10 padded to 16 lanes
    assert pick_config(64, 40) == (64, 4)  # fewer rows than a tile: one tile
    assert pick_config(1, 1) == (1, 4)
    plan = split_plan(2, 4096, 32, 10, (4096, 264, 8))  # 32 groups × 16 lanes a row: 8 rows a tile
    assert (plan["BLOCK_G"], plan["BLOCK_CG"], plan["BLOCK_L"]) == (32, 16, 8)
    assert (plan["S"], plan["rows_per"]) == (128, 32)  # 132 parts asked per sample: 32 rows each, so 128
    for batch, rows, cg, config in ((2, 1024, 20, (4096, 264, 8)), (1, 99, 30, (512, 7, 4)), (16, 64, 80, (64, 8, 4))):
        plan = split_plan(batch, rows, 32, cg, config)
        assert plan["rows_per"] % plan["BLOCK_L"] == 0  # parts begin on a tile
        assert (plan["S"] - 1) * plan["rows_per"] < rows <= plan["S"] * plan["rows_per"]  # every part has rows


def test_norm_act_sequential_fuses_the_silu_into_the_norm_call(monkeypatch):
    torch.manual_seed(0)
    layers = [GroupNorm(4, 8), nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1), GroupNorm(4, 8), nn.Identity(), nn.SiLU()]
    fused, plain = NormActSequential(*layers), nn.Sequential(*layers)
    x = torch.randn(2, 8, 5, 5)
    calls = []
    forward = GroupNorm.forward
    monkeypatch.setattr(GroupNorm, "forward", lambda self, x, silu=False: calls.append(silu) or forward(self, x, silu))
    torch.testing.assert_close(fused(x), plain(x), atol=0, rtol=0)
    assert calls == [True, False, False, False]  # fused: the first norm with its SiLU, the second alone (no SiLU next)
    assert isinstance(fused[:2], NormActSequential) and set(fused.state_dict()) == set(plain.state_dict())


def test_the_kernel_is_used_only_where_its_rules_allow(monkeypatch):
    x = torch.randn(1, 8, 2, 2).half()
    assert not kernels.available(x)  # a CPU tensor
    monkeypatch.setattr(kernels, "available", lambda t: True)
    monkeypatch.setattr(norm, "KERNEL_INFERENCE", True)
    with torch.no_grad():
        assert norm.use_kernel(x)
    assert not norm.use_kernel(x)  # gradients on: training graphs keep inductor's norms
    monkeypatch.setattr(norm, "KERNEL_INFERENCE", False)
    with torch.no_grad():
        assert not norm.use_kernel(x)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_op_matches_torch_at_sd_shapes_on_the_gpu(dtype):
    op = kernels.group_norm_op()
    torch.manual_seed(0)
    for b, c, side, silu in ((2, 320, 64, True), (1, 960, 32, False), (2, 1280, 8, True), (2, 2560, 16, True)):
        x = (torch.randn(b, c, side, side, device="cuda") * 2 + 3).to(dtype).contiguous(
            memory_format=torch.channels_last)
        w, bias = torch.randn(c, device="cuda", dtype=dtype), torch.randn(c, device="cuda", dtype=dtype)
        y = op(x, w, bias, 32, 1e-5, silu)
        ref = torch.nn.functional.group_norm(x.float(), 32, w.float(), bias.float(), 1e-5)
        ref = torch.nn.functional.silu(ref) if silu else ref
        assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
        tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
        torch.testing.assert_close(y.float(), ref, atol=tol * ref.abs().max().item(), rtol=0)


@pytest.mark.gpu
@gpu
def test_the_compiled_unet_with_the_kernel_matches_it_without(monkeypatch):
    from ldm.kernels import group_norm as kg

    params = {**TINY_V1, "model_channels": 64, "image_size": 32}
    model = build(params).cuda().half().to(memory_format=torch.channels_last)
    inp = {k: v.cuda() for k, v in inputs(params).items()}
    inp["x"], inp["context"] = inp["x"].half().contiguous(memory_format=torch.channels_last), inp["context"].half()
    n_norms = sum(isinstance(m, GroupNorm) for m in model.modules())
    traced = []
    launch = kg.launch
    monkeypatch.setattr(kg, "launch", lambda *a, **kw: traced.append(a[6]) or launch(*a, **kw))
    with torch.no_grad():
        torch._dynamo.reset()
        monkeypatch.setattr(norm, "KERNEL_INFERENCE", False)
        ref = torch.compile(model, fullgraph=True)(**inp).float()
        assert traced == []
        torch._dynamo.reset()
        monkeypatch.setattr(norm, "KERNEL_INFERENCE", True)
        out = torch.compile(model, fullgraph=True)(**inp).float()
        eager = model(**inp).float()
    # every norm went through the kernel; those of the ResBlocks and the output head with their SiLU
    assert len(traced) >= n_norms and traced.count(True) >= n_norms - sum(
        type(m).__name__ == "SpatialTransformer" for m in model.modules())
    scale = eager.abs().max().item()
    assert (out - ref).abs().max().item() < 5e-3 * scale
    assert (out - eager).abs().max().item() < 5e-3 * scale
