"""ldm.kernels: the Triton GEGLU and one-tile attention compute what torch computes (on the CPU through Triton's
interpreter, on a GPU compiled), and the U-Net uses them only where their rules say."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ldm
from ldm import kernels
from ldm.fast import optimize
from ldm.unet.attention import GEGLU, CrossAttention

ROOT = Path(__file__).resolve().parents[1]

# Odd sizes on purpose: rows, columns and the reduction not multiples of the tiles; keys and head widths padded.
INTERPRETED = textwrap.dedent("""
    import torch, torch.nn.functional as F
    from ldm.kernels import geglu as kg, short_attention as ka
    torch.manual_seed(0)
    for m, k, n, tile in ((100, 72, 40, (32, 16, 32, 4, 4, 1)), (33, 64, 24, (16, 16, 16, 2, 4, 1))):
        x, w, b = torch.randn(m, k), torch.randn(2 * n, k) / k ** 0.5, torch.randn(2 * n) * 0.1
        y = torch.full((m, n), float("nan"))
        kg.launch(x, w, b, y, config=tile)
        a, g = F.linear(x, w, b).chunk(2, dim=-1)
        torch.testing.assert_close(y, a * F.gelu(g), atol=1e-5, rtol=1e-5)
    for bsz, heads, lq, lk, d in ((2, 3, 50, 77, 40), (1, 2, 20, 64, 80), (1, 1, 9, 5, 160)):
        qf, kv = torch.randn(bsz, lq, heads * d), torch.randn(bsz, lk, 2 * heads * d)
        q = qf.unflatten(-1, (heads, d)).transpose(1, 2)  # strided views, as the U-Net passes them
        k, v = (t.unflatten(-1, (heads, d)).transpose(1, 2) for t in kv.chunk(2, dim=-1))
        o = torch.full((bsz, lq, heads, d), float("nan")).transpose(1, 2)
        ka.launch(q, k, v, o, config=(16, 4, 1))
        torch.testing.assert_close(o, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    print("ok")
""")


def test_the_kernels_compute_geglu_and_attention_in_triton_s_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_the_rules_take_only_the_measured_shapes(monkeypatch):
    monkeypatch.setattr(kernels, "available", lambda t: True)
    w = torch.empty(2 * 2560, 640)
    assert kernels.geglu_applies(torch.empty(2, 1024, 640), w, torch.empty(2 * 2560))
    assert not kernels.geglu_applies(torch.empty(2, 4096, 320), torch.empty(2560, 320), torch.empty(2560))
    assert not kernels.geglu_applies(torch.empty(2, 1024, 640), w, None)
    q = torch.empty(2, 8, 1024, 80)
    text = torch.empty(2, 8, 77, 80)
    assert kernels.short_attention_applies(q, text, text)
    assert not kernels.short_attention_applies(q, q, q)  # 1024 keys: the flash kernels' job
    big = torch.empty(2, 8, 4096, 40)  # 64 K query rows: cuDNN's kernel fills the card
    assert not kernels.short_attention_applies(big, torch.empty(2, 8, 77, 40), torch.empty(2, 8, 77, 40))


def test_off_the_measured_cards_the_modules_keep_the_library_path():
    ff, attn = GEGLU(640, 16), CrossAttention(640, 32, heads=8, dim_head=80)
    for m in (ff, attn):
        m.kernels = True
    x, ctx = torch.randn(1, 6, 640), torch.randn(1, 77, 32)
    with torch.no_grad():
        assert not kernels.available(x)  # CPU
        a, g = ff.proj(x).chunk(2, dim=-1)
        torch.testing.assert_close(ff(x), a * F.gelu(g))
        assert not attn._short_kernel(*(attn._split_heads(t) for t in attn._project(x, ctx)))


def test_optimize_switches_the_kernels_on_and_off():
    model = ldm.load(config="configs/tiny/txt2img.yaml")
    optimize(model, compile=False, compile_text=False)
    mods = [m for m in model.unet.modules() if isinstance(m, (GEGLU, CrossAttention))]
    assert mods and all(m.kernels for m in mods)
    optimize(model, compile=False, compile_text=False, kernels=False)
    assert not any(m.kernels for m in mods)



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compiled", [False, True])
def test_the_ops_match_torch_on_a_gpu(compiled):
    ops = (kernels.geglu_op(), kernels.short_attention_op())
    if compiled:
        ops = tuple(torch.compile(op, mode="reduce-overhead", fullgraph=True) for op in ops)
    geglu, short = ops
    gen = torch.Generator("cuda").manual_seed(0)
    h = dict(device="cuda", dtype=torch.float16, generator=gen)
    x, w, b = torch.randn(2, 1000, 640, **h), torch.randn(5120, 640, **h) / 640**0.5, torch.randn(5120, **h) * 0.1
    a, g = F.linear(x.float(), w.float(), b.float()).chunk(2, dim=-1)
    with torch.no_grad():
        for _ in range(3):  # a CUDA graph's replays too
            torch.testing.assert_close(geglu(x, w, b).float(), a * F.gelu(g), atol=8e-3, rtol=4e-3)
        for lq, lk, d in ((1024, 77, 80), (256, 77, 160), (64, 64, 160)):
            q = torch.randn(2, lq, 8 * d, **h).unflatten(-1, (8, d)).transpose(1, 2)
            kv = torch.randn(2, lk, 16 * d, **h)
            k, v = (t.unflatten(-1, (8, d)).transpose(1, 2) for t in kv.chunk(2, dim=-1))
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
            torch.testing.assert_close(short(q, k, v).float(), ref, atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_compiled_unet_with_the_kernels_matches_it_without(monkeypatch):
    if torch.cuda.get_device_capability() not in kernels.MEASURED_CAPABILITIES:
        pytest.skip("the kernels run on compute capability 9.0 only")
    monkeypatch.setattr(kernels, "GEGLU_MIN_IN", 0)  # the tiny config's widths are below SD's
    model = ldm.load(config="configs/tiny/txt2img.yaml", device="cuda", dtype=torch.float16)
    unet = model.unet
    gen = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(2, unet.in_channels, 16, 16, device="cuda", dtype=torch.float16, generator=gen)
    t = torch.tensor([10.0, 500.0], device="cuda")
    with torch.no_grad():
        ctx = model.encode_text(["a red apple", "a green pear"]).to(torch.float16)  # (2, 77, context_dim)
        ref = unet(x, t, ctx)
        calls = []
        for name in ("geglu_op", "short_attention_op"):
            real = getattr(kernels, name)
            monkeypatch.setattr(kernels, name, lambda real=real, name=name: calls.append(name) or real())
        unet.use_kernels(True)
        out = torch.compile(unet.forward, mode="reduce-overhead", fullgraph=True)(x, t, ctx)
    assert {"geglu_op", "short_attention_op"} <= set(calls)
    torch.testing.assert_close(out, ref, atol=5e-3, rtol=5e-3)
