"""The ``fa4`` attention backend (FlashAttention-4, ldm.attention_fa4).

Default suite (CPU): the error without the package, the SDPA fallback for inputs without a kernel and for inputs
that need gradients, and the custom operator's fake shape (what ``torch.compile`` traces). ``-m fa4`` (a Hopper or
Blackwell GPU with flash-attn-4): the kernel against fp32 attention, compiled and CUDA-graph calls, and a U-Net with
SD-1.5's 40-wide heads against the same U-Net on SDPA.
"""
from __future__ import annotations

import logging
import sys

import pytest
import torch
import torch.nn.functional as F

from ldm.attention import AttentionBackendError, attention, check_backend
from ldm.attention_fa4 import fa4_fwd, interface, kernel_for
from ldm.unet import UNetModel

# SD-1.5's heads at 64×64 latents, fewer query tokens: (query tokens, key tokens, heads, head dim)
SHAPES = [(1024, 1024, 8, 40), (1024, 77, 8, 40), (256, 256, 8, 80), (256, 77, 8, 80), (64, 64, 8, 160),
          (64, 77, 8, 160)]
# a U-Net whose heads are SD-1.5's width (40) at every level
UNET_40 = dict(image_size=16, in_channels=4, out_channels=4, model_channels=160, attention_resolutions=[4, 2, 1],
               num_res_blocks=1, channel_mult=[1, 2, 2], num_head_channels=40, use_spatial_transformer=True,
               use_linear_in_transformer=True, transformer_depth=1, context_dim=64, use_checkpoint=False, legacy=False)


def qkv(b: int, lq: int, lk: int, h: int, d: int, dtype=torch.float32, device="cpu", grad=False, seed=0):
    g = torch.Generator(device).manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g, device=device, dtype=dtype)
    k, v = (torch.randn(b, h, lk, d, generator=g, device=device, dtype=dtype) for _ in range(2))
    return [t.requires_grad_(grad) for t in (q, k, v)]


def test_without_the_package_the_backend_is_refused_naming_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import flash_attn raises ImportError
    interface.cache_clear()
    try:
        with pytest.raises(AttentionBackendError, match=r"'fa4'.*pip install 'ldm\[fa4\]'"):
            check_backend("fa4")
        with pytest.raises(AttentionBackendError, match="flash-attn-4"):
            UNetModel(**UNET_40, attn_backend="fa4")
    finally:
        interface.cache_clear()


def test_inputs_without_a_kernel_go_to_sdpa_said_once(caplog):
    q, k, v = qkv(2, 16, 7, 2, 8)
    assert kernel_for(q, k, v) == "cpu tensors"
    with caplog.at_level(logging.INFO, logger="ldm.attention_fa4"):
        outs = [attention(q, k, v, backend="fa4") for _ in range(2)]
    for out in outs:
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=0, atol=0)
    notes = [r.getMessage() for r in caplog.records if "fa4" in r.getMessage()]
    assert notes == ["attention backend 'fa4' has no kernel for cpu tensors: those calls use SDPA"]
    compiled = torch.compile(lambda q, k, v: attention(q, k, v, backend="fa4"), fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), outs[0])


def test_the_operator_traces_with_its_fake_shape():
    """What torch.compile sees of the kernel: the output, (B, Lq, H, d_v) in q's dtype (meta tensors: no kernel
    runs)."""
    q = torch.randn(2, 33, 4, 40, device="meta", dtype=torch.float16)  # (B, Lq, H, d)
    k, v = (torch.randn(2, 77, 4, 40, device="meta", dtype=torch.float16) for _ in range(2))
    out = fa4_fwd(q, k, v, 0.5)
    assert (out.shape, out.dtype) == ((2, 33, 4, 40), torch.float16)


def test_inputs_that_need_gradients_go_to_sdpa(caplog):
    """Training runs SDPA: FA4 4.0.0b36's SM90 backward gave wrong query gradients at SD's head dimensions (an H100,
    docs/results/fa4-h100-2026-12-07-twenty-second.txt). Under no_grad the same inputs are FA4's (off a GPU: SDPA
    for the device)."""
    q, k, v = qkv(2, 16, 7, 2, 8, grad=True)
    assert kernel_for(q, k, v).startswith("inputs that need gradients")
    with torch.no_grad():
        assert kernel_for(q, k, v) == "cpu tensors"
    with caplog.at_level(logging.INFO, logger="ldm.attention_fa4"):
        out = attention(q, k, v, backend="fa4")
    out.sum().backward()
    ref = [t.detach().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(*ref).sum().backward()
    for a, b in zip((q, k, v), ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    assert "has no kernel for inputs that need gradients" in caplog.text


# ---- on a Hopper or Blackwell GPU with flash-attn-4 (-m fa4) ----

def _max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).abs().max())


@pytest.mark.fa4
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_the_kernel_computes_attention_as_fp32_does(shape, dtype):
    lq, lk, h, d = shape
    q, k, v = qkv(2, lq, lk, h, d, dtype, "cuda")
    assert kernel_for(q, k, v) is None
    ref = attention(q.float(), k.float(), v.float(), backend="math")
    err_fa4 = _max_err(attention(q, k, v, backend="fa4"), ref)
    err_sdpa = _max_err(F.scaled_dot_product_attention(q, k, v), ref)
    assert err_fa4 <= 2 * err_sdpa + 1e-3, (err_fa4, err_sdpa)


@pytest.mark.fa4
def test_compiled_and_graphed_calls_compute_the_eager_ones():
    q, k, v = qkv(2, 1024, 77, 8, 40, torch.float16, "cuda")
    eager = attention(q, k, v, backend="fa4")
    compiled = torch.compile(lambda q, k, v: attention(q, k, v, backend="fa4"), fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), eager, rtol=0, atol=0)
    static = [t.clone() for t in (q, k, v)]
    attention(*static, backend="fa4")  # compiled for this shape before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention(*static, backend="fa4")
    q2, k2, v2 = qkv(2, 1024, 77, 8, 40, torch.float16, "cuda", seed=5)
    for s, new in zip(static, (q2, k2, v2)):
        s.copy_(new)
    graph.replay()
    torch.testing.assert_close(out, attention(q2, k2, v2, backend="fa4"), rtol=0, atol=0)


@pytest.mark.fa4
def test_a_unet_with_sd_heads_computes_what_it_does_on_sdpa():
    torch.manual_seed(0)
    net = UNetModel(**UNET_40).cuda().half().eval()
    x = torch.randn(2, 4, 32, 32, device="cuda", dtype=torch.half)
    t, c = torch.tensor([10, 500], device="cuda"), torch.randn(2, 77, 64, device="cuda", dtype=torch.half)
    with torch.no_grad():
        ref = net.float()(x.float(), t, context=c.float())
        net.half()
        sdpa = net(x, t, context=c)
        net.set_attention_backend("fa4")
        fa4 = net(x, t, context=c)
    assert _max_err(fa4, ref) <= 2 * _max_err(sdpa, ref) + 1e-3

