"""What the networks' building blocks do as a user sees it, against the reference (diffusers given the same weights)
and path against path: dropout in training, output layout, hoisting without fusing, the attention backends and the
fp32 accumulation in low and high precision, and the error for a latent too small for average-pool downsampling."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldm.attention import attention
from ldm.norm import group_norm_nhwc
from ldm.unet.attention import CrossAttention, SpatialTransformer
from ldm.unet.blocks import ResBlock
from test_unet import TINY_V1, TINY_V2, build, inputs, to_diffusers

LINEAR_AND_CONV = pytest.mark.parametrize("params", [TINY_V1, TINY_V2], ids=["v1-conv-proj", "v2-linear-proj"])


def _dropout_rates(model: torch.nn.Module, owner: type) -> set[float]:
    """The rates of the Dropout modules inside every ``owner`` module of ``model``."""
    owners = [m for m in model.modules() if isinstance(m, owner)]
    return {d.p for m in owners for d in m.modules() if isinstance(d, torch.nn.Dropout)}


@LINEAR_AND_CONV
def test_training_dropout_is_the_resblocks_only_and_samples_what_diffusers_samples(params):
    """The U-Net's ``dropout`` acts in the ResBlocks only, as in the original and in diffusers (whose transformers get
    none): in training, with the same seed, the output is diffusers' to float rounding (the same masks, drawn in the
    same order), and dropout does act (not the eval output)."""
    params = {**params, "dropout": 0.3}
    ours = build(params).train()
    ref, _ = to_diffusers(ours, params, dropout=0.3)
    ref.train()
    inp = inputs(params)
    assert _dropout_rates(ours, ResBlock) == {0.3} and _dropout_rates(ours, SpatialTransformer) == {0.0}
    with torch.no_grad():
        torch.manual_seed(7)
        out = ours(**inp)
        torch.manual_seed(7)
        expected = ref(inp["x"], inp["timesteps"], encoder_hidden_states=inp["context"]).sample
        evaluated = ours.eval()(**inp)
    scale = expected.abs().max().item()
    assert (out - expected).abs().max().item() <= 1e-4 * scale
    assert (out - evaluated).abs().max().item() > 0.1 * scale


@LINEAR_AND_CONV
def test_output_keeps_the_inputs_memory_format(params):
    """An NCHW input gives an NCHW-contiguous output (as the original's ``.contiguous()`` after the transformer):
    the linear projection's view no longer leaks NHWC strides out; a channels_last model and input stay so."""
    model = build(params)
    inp = inputs(params)
    with torch.no_grad():
        out = model(**inp)
        assert out.is_contiguous()
        out.view(out.shape[0], -1)  # what a caller flattening ε does
        model.to(memory_format=torch.channels_last)
        cl = model(**{**inp, "x": inp["x"].contiguous(memory_format=torch.channels_last)})
    assert cl.is_contiguous(memory_format=torch.channels_last)
    assert (cl - out).abs().max().item() <= 1e-5 * out.abs().max().item()


def test_hoisting_alone_and_undone_leaves_no_fused_copy():
    """hoist_conditioning() then hoist_conditioning(False), without fuse_projections(): the cross-attentions project
    K and V from their own (current) weights again, and the U-Net trains; after fuse_projections() the undo still
    gives the fused [W_K; W_V] back."""
    model = build(TINY_V1)
    inp = inputs(TINY_V1)
    cross = [m for m in model.modules() if isinstance(m, CrossAttention) and not m.is_self_attention]
    with torch.no_grad():
        model.hoist_conditioning()
        hoisted = model(**inp)
        model.hoist_conditioning(False)
        assert all(m.fused_weight is None for m in model.modules() if isinstance(m, CrossAttention))
        assert (model(**inp) - hoisted).abs().max().item() <= 1e-5
        cross[0].to_k.weight.mul_(2.0)  # a weight change after the undo is seen: no stale copy
        assert (model(**inp) - hoisted).abs().max().item() > 1e-3
    model.train()
    model(**inp).mean().backward()  # was: "fused projections are for inference"
    model.eval().fuse_projections()
    model.hoist_conditioning(False)
    assert all(m.fused_weight is not None and m.fused_weight.shape[0] == 2 * m.to_k.out_features for m in cross)


def _qkv(mag: float, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    q, k = ((torch.randn(1, 2, 16, 64, generator=g) + 1) * mag for _ in range(2))  # logits ~ mag²·64/8
    v = torch.randn(1, 2, 16, 64, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def test_math_backend_agrees_with_sdpa_on_large_fp16_logits():
    """q·kᵀ of fp16 activations can pass fp16's 65504 where q·kᵀ/√d does not: the math backend scales first (as
    SDPA's kernels do) and takes its softmax in fp32, so it agrees with SDPA instead of returning NaN."""
    q, k, v = _qkv(40.0, torch.float16)
    exact = attention(q.double(), k.double(), v.double(), backend="math")
    assert torch.isinf(torch.einsum("bhid,bhjd->bhij", q, k)).any()  # the unscaled product overflows
    for backend in ("sdpa", "math"):
        out = attention(q, k, v, backend=backend)
        assert out.dtype == torch.float16 and torch.isfinite(out).all(), backend
        assert (out.double() - exact).abs().max().item() <= 2e-2, backend


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_upcast_never_lowers_float64(backend):
    """``upcast`` raises fp16/bf16 to fp32; a float64 attention (reference runs) stays float64, not fp32."""
    q, k, v = _qkv(1.0, torch.float64)
    plain = attention(q, k, v, backend=backend)
    up = attention(q, k, v, backend=backend, upcast=True)
    assert up.dtype == torch.float64
    assert (up - plain).abs().max().item() <= 1e-12
    assert (attention(q.half(), k.half(), v.half(), backend, upcast=True).double() - plain).abs().max() <= 2e-3


def test_channels_last_group_norm_keeps_float64():
    """group_norm_nhwc (compiled channels_last inference) accumulates in fp32 for fp16/bf16 and in float64 for
    float64, as nn.GroupNorm does in eager mode."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 64, 5, 3, generator=g, dtype=torch.float64) * 3 + 7).contiguous(
        memory_format=torch.channels_last)
    w, b = (torch.randn(64, generator=g, dtype=torch.float64) for _ in range(2))
    ref = F.group_norm(x.contiguous(), 32, w, b, 1e-5)
    for stats in ("partial", "shifted", "welford"):
        y = group_norm_nhwc(x, 32, w, b, 1e-5, stats)
        assert y.dtype == torch.float64 and (y - ref).abs().max().item() <= 1e-10, stats
    half = group_norm_nhwc(x.half(), 32, w.half(), b.half(), 1e-5)
    assert half.dtype == torch.float16 and (half.double() - ref).abs().max().item() <= 5e-2


@pytest.mark.parametrize("option", [{"conv_resample": False}, {"resblock_updown": True}])
def test_average_pool_unet_names_the_smallest_latent(option):
    """2×2 average pooling floors each side, so a side below 2^(levels − 1) would reach 0: a ValueError says so
    (not torch's "Output size is too small" from inside a block); that size itself and odd sizes above it run."""
    params = {**TINY_V1, **option}
    model = build(params)
    inp = inputs(params)
    with torch.no_grad(), pytest.raises(ValueError, match=r"\(7, 9\).*average pooling 3 times.*at least 8"):
        model(torch.randn(2, 4, 7, 9), inp["timesteps"], inp["context"])
    with torch.no_grad():
        assert model(torch.randn(2, 4, 8, 11), inp["timesteps"], inp["context"]).shape == (2, 4, 8, 11)
        # a stride-2 convolution rounds up: the conv-resampling U-Net takes a 1×1 latent
        assert build(TINY_V1)(torch.randn(2, 4, 1, 1), inp["timesteps"], inp["context"]).shape == (2, 4, 1, 1)


def test_per_layer_context_widths_are_refused_by_name():
    """A context_dim list of different widths built cross-attentions that no call could feed (forward passes one
    context to all); one width, as an int or a list, still builds."""
    from ldm.unet.model import UNetModel

    with pytest.raises(ValueError, match=r"context_dim=\[32, 64\]: per-layer context widths"):
        UNetModel(**dict(TINY_V1, transformer_depth=2, context_dim=[32, 64]))
    unet = UNetModel(**dict(TINY_V1, transformer_depth=2, context_dim=[32, 32]))
    x, t, c = torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 5, 32)
    assert unet(x, t, context=c).shape == x.shape
