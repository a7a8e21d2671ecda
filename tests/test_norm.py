"""ldm.norm.GroupNorm: same numbers and keys as nn.GroupNorm, and a compiled channels_last training graph that saves
no activation in NCHW strides (the layout copies of the backward's convolutions, docs/BENCHMARKS.md)."""
from __future__ import annotations

import pytest
import torch
from functorch.compile import make_boxed_func
from torch import nn
from torch._functorch.aot_autograd import aot_module_simplified
from torch._functorch.partitioners import min_cut_rematerialization_partition

import ldm.norm as norm_module
from ldm.norm import GroupNorm, compiling_with_grad, group_norm_nhwc, group_stats
from ldm.unet.blocks import ResBlock
from ldm.unet.model import UNetModel
from test_unet import randomize_

TINY = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2],
            num_res_blocks=1, channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True,
            transformer_depth=1, context_dim=16, use_checkpoint=False, legacy=False)


def saved_layouts(model: nn.Module, *inputs: torch.Tensor) -> dict[str, int]:
    """Compile ``model`` with AOT autograd and count the 4-D activations its forward graph saves for the backward
    by layout, from the strides autograd records (what inductor must produce at that boundary)."""
    counts = {"channels_last": 0, "nchw": 0}

    def fw(graph: torch.fx.GraphModule, _inputs):
        for node in list(graph.graph.nodes)[-1].args[0]:
            v = getattr(node, "meta", {}).get("val")
            if isinstance(v, torch.Tensor) and v.dim() == 4 and v.shape[1] > 1 and v.shape[2] * v.shape[3] > 1:
                counts["nchw" if v.is_contiguous() else "channels_last"] += 1
        return make_boxed_func(graph.forward)

    def backend(gm: torch.fx.GraphModule, example_inputs):
        return aot_module_simplified(gm, example_inputs, fw_compiler=fw,
                                     bw_compiler=lambda g, _i: make_boxed_func(g.forward),
                                     partition_fn=min_cut_rematerialization_partition)

    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.compile(model, backend=backend, fullgraph=True)(*inputs)
    y.float().square().mean().backward()
    torch._dynamo.reset()
    return counts


def test_compiling_with_grad_is_true_only_in_a_traced_graph_that_autograd_differentiates():
    def probe(x: torch.Tensor, check_x: bool) -> torch.Tensor:
        return x * (2.0 if compiling_with_grad(x if check_x else None) else 3.0)

    traced = torch.compile(probe, backend="eager", fullgraph=True)
    leaf, plain = torch.ones(3, requires_grad=True), torch.ones(3)
    assert float(traced(leaf, True)[0]) == 2.0
    assert float(traced(plain, False)[0]) == 2.0  # no tensor to ask: grad mode alone decides
    assert float(traced(plain, True)[0]) == 3.0  # x needs no gradient
    with torch.no_grad():
        assert float(traced(leaf, True)[0]) == 3.0 and float(traced(plain, False)[0]) == 3.0
    assert float(probe(leaf, True)[0]) == 3.0  # eager
    assert not compiling_with_grad()


def test_same_numbers_strides_and_keys_as_nn_groupnorm_in_eager():
    x = torch.randn(2, 64, 6, 5).to(memory_format=torch.channels_last)
    ours, ref = GroupNorm(32, 64, eps=1e-6), nn.GroupNorm(32, 64, eps=1e-6)
    with torch.no_grad():
        ref.weight.normal_(), ref.bias.normal_()
    assert ours.load_state_dict(ref.state_dict()) is not None
    y, y_ref = ours(x), ref(x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    assert y.stride() == y_ref.stride()  # eager is nn.GroupNorm exactly, strides included
    assert list(ours.state_dict()) == ["weight", "bias"]


def test_compiled_channels_last_resblock_saves_no_nchw_activation():
    torch.manual_seed(0)
    block = ResBlock(64, 32, out_channels=64).to(memory_format=torch.channels_last)
    x = torch.randn(2, 64, 8, 8).to(memory_format=torch.channels_last).requires_grad_()
    emb = torch.randn(2, 32)
    ours = saved_layouts(block, x, emb)
    assert ours["nchw"] == 0 and ours["channels_last"] > 0, ours
    # The control: the same block with torch's GroupNorm saves its norms' outputs in NCHW strides.
    for name, m in list(block.named_modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, GroupNorm):
                plain = nn.GroupNorm(child.num_groups, child.num_channels, child.eps)
                plain.load_state_dict(child.state_dict())
                setattr(m, child_name, plain)
    assert saved_layouts(block, x, emb)["nchw"] > 0


def test_compiled_channels_last_unet_saves_no_nchw_activation():
    torch.manual_seed(0)
    unet = UNetModel(**TINY).to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 8, 8).to(memory_format=torch.channels_last)
    counts = saved_layouts(unet, x, torch.tensor([10, 500]), torch.randn(2, 5, 16))
    assert counts["nchw"] == 0 and counts["channels_last"] > 20, counts


def test_nchw_input_stays_nchw_when_compiled():
    norm = GroupNorm(8, 16)
    y = torch.compile(norm, backend="aot_eager", fullgraph=True)(torch.randn(2, 16, 4, 4))
    assert y.is_contiguous()
    torch._dynamo.reset()


def graph_targets(fn, *inputs: torch.Tensor) -> set[str]:
    """The names of the functions and tensor methods dynamo's graph of ``fn`` calls (torch-level, before
    decomposition)."""
    names: set[str] = set()

    def backend(gm: torch.fx.GraphModule, _inputs):
        names.update(getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes
                     if n.op in ("call_function", "call_method"))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*inputs)
    torch._dynamo.reset()
    return names


def test_group_norm_nhwc_is_group_norm_in_channels_last():
    from ldm.norm import group_norm_nhwc

    torch.manual_seed(0)
    x = (torch.randn(2, 64, 6, 5) * 3 + 1.5).to(memory_format=torch.channels_last)
    w, b = torch.randn(64), torch.randn(64)
    for weight, bias in ((w, b), (None, None), (w, None)):
        y = group_norm_nhwc(x, 16, weight, bias, 1e-6)
        torch.testing.assert_close(y, nn.functional.group_norm(x, 16, weight, bias, 1e-6), rtol=1e-5, atol=1e-5)
        assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    # half precision in, statistics in float32, half out: as close to the float32 result as fp16 rounding allows
    y16 = group_norm_nhwc(x.half(), 16, w.half(), b.half(), 1e-6)
    assert y16.dtype == torch.float16
    ref = nn.functional.group_norm(x.half().float(), 16, w.half().float(), b.half().float(), 1e-6)
    torch.testing.assert_close(y16.float(), ref, rtol=0, atol=4e-3)


def test_force_channels_last_copies_only_when_needed():
    from ldm.norm import channels_last_strides, force_channels_last

    x = torch.randn(2, 6, 4, 5)
    y = force_channels_last(x)
    assert y.stride() == channels_last_strides(x.shape) == (120, 1, 30, 6)
    assert torch.equal(y, x)
    cl = x.to(memory_format=torch.channels_last)
    assert force_channels_last(cl).data_ptr() == cl.data_ptr()  # no copy


@pytest.mark.parametrize("parts", [4, 8])
@pytest.mark.parametrize("rows", [1, 36, 60, 4096 + 64])
def test_partial_stats_at_any_row_count(rows, parts, monkeypatch):
    """The partial sums split L into gcd(L, parts) runs (1, 4, 4, 4 and 1, 4, 4, 8 here): all give the group's
    moments."""
    import ldm.norm
    from ldm.norm import group_stats

    monkeypatch.setattr(ldm.norm, "STATS_PARTS", parts)

    torch.manual_seed(rows)
    xs = torch.randn(2, rows, 4, 3, dtype=torch.float64) * 2 + 1
    var_ref, mean_ref = torch.var_mean(xs, dim=(1, 3), keepdim=True, correction=0)
    var, mean = group_stats(xs, "partial")
    assert var.shape == mean.shape == (2, 1, 4, 1)
    torch.testing.assert_close(mean, mean_ref)
    torch.testing.assert_close(var, var_ref)


def test_partial_stats_compile_with_a_dynamic_row_count():
    """A recompile for a new size makes the rows dimension symbolic (Dynamo's automatic dynamic shapes): the run
    count is found without math.gcd, which refuses a symbolic int (sampling at a second resolution, 12-04)."""
    import math

    from ldm.norm import common_divisor, group_stats

    assert [common_divisor(n, 4) for n in (1, 2, 6, 36, 4160)] == [math.gcd(n, 4) for n in (1, 2, 6, 36, 4160)]
    assert [common_divisor(n, 8) for n in (12, 64, 4100)] == [4, 8, 4]
    compiled = torch.compile(lambda xs: group_stats(xs, "partial"), backend="eager", fullgraph=True, dynamic=True)
    for rows in (36, 60):
        xs = torch.randn(2, rows, 4, 3, dtype=torch.float64)
        var_ref, mean_ref = torch.var_mean(xs, dim=(1, 3), keepdim=True, correction=0)
        var, mean = compiled(xs)
        torch.testing.assert_close(mean, mean_ref)
        torch.testing.assert_close(var, var_ref)


def test_group_stats_shifted_sums_match_welford_far_from_zero():
    from ldm.norm import group_stats

    torch.manual_seed(0)
    xs = torch.randn(2, 4096, 8, 10, dtype=torch.float64) * 0.01 + 300.0  # spread 3e-5 of the distance from 0
    var_ref, mean_ref = torch.var_mean(xs, dim=(1, 3), keepdim=True, correction=0)
    for method in ("partial", "shifted", "welford"):
        var, mean = group_stats(xs.float(), method)
        assert var.shape == mean.shape == (2, 1, 8, 1)
        torch.testing.assert_close(mean.double(), mean_ref, rtol=1e-6, atol=0)
        torch.testing.assert_close(var.double(), var_ref, rtol=1e-3, atol=0)
    try:
        group_stats(xs.float(), "sums")
    except ValueError as e:
        assert "group_stats method" in str(e) and "'sums'" in str(e) and "partial" in str(e)
    else:
        raise AssertionError("an unknown method was accepted")


def test_compiled_inference_normalizes_in_channels_last_and_training_keeps_native():
    norm = GroupNorm(8, 32)
    x = torch.randn(2, 32, 4, 4).to(memory_format=torch.channels_last)
    import ldm.norm

    with torch.no_grad():
        inference = graph_targets(norm, x)
        assert "group_norm" not in inference and "sum" in inference and "var_mean" not in inference, inference
        assert "inductor_force_stride_order" in inference, inference  # the layout request on the input
        default, ldm.norm.NHWC_STATS = ldm.norm.NHWC_STATS, "welford"  # bench.py's --candidate gn-welford
        try:
            welford = graph_targets(norm, x)
        finally:
            ldm.norm.NHWC_STATS = default
    assert "group_norm" not in welford and "var_mean" in welford, welford
    training = graph_targets(norm, x.requires_grad_())
    assert "group_norm" in training and "var_mean" not in training, training
    ldm.norm.NHWC_INFERENCE = False  # bench.py's --candidate gn-native
    try:
        with torch.no_grad():
            assert "group_norm" in graph_targets(norm, x.detach())
    finally:
        ldm.norm.NHWC_INFERENCE = True


def test_nhwc_training_norm_is_group_norm_with_channels_last_gradients(monkeypatch):
    """``NHWC_TRAINING`` (bench.py's ``--candidate gn-nhwc-train``): the training graph normalizes with
    group_norm_nhwc, no native_group_norm left; its gradients are nn.GroupNorm's, the input's in channels_last."""
    import ldm.norm

    monkeypatch.setattr(ldm.norm, "NHWC_TRAINING", True)
    norm = GroupNorm(8, 32)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x = torch.randn(2, 32, 4, 4).to(memory_format=torch.channels_last).requires_grad_()
    targets = graph_targets(norm, x)
    assert "group_norm" not in targets and "sum" in targets, targets
    g = torch.randn(2, 32, 4, 4).to(memory_format=torch.channels_last)
    y = group_norm_nhwc(x, 8, norm.weight, norm.bias, norm.eps)  # eager: the same ops the graph differentiates
    dx, dw = torch.autograd.grad(y, [x, norm.weight], g)
    ref_dx, ref_dw = torch.autograd.grad(nn.GroupNorm.forward(norm, x), [x, norm.weight], g)
    torch.testing.assert_close(y, nn.GroupNorm.forward(norm, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dw, ref_dw, rtol=1e-4, atol=1e-5)
    assert dx.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.slow  # a compiled training graph of the tiny U-Net: ~2 min on 2 cores
@pytest.mark.parametrize("nhwc", [False, True])
def test_compiled_training_matches_eager(nhwc, monkeypatch):
    """The compiled U-Net's loss and gradients are eager's (inductor on the CPU), with the default training norms
    and the layout-keeping upsampling backward (ldm.resample), and with ``NHWC_TRAINING``."""
    import ldm.norm

    monkeypatch.setattr(ldm.norm, "NHWC_TRAINING", nhwc)
    torch.manual_seed(0)
    # random weights: the zero-initialised output conv would make the loss 0 and every gradient 0 on both sides
    unet = randomize_(UNetModel(**TINY)).to(memory_format=torch.channels_last)
    args = (torch.randn(2, 4, 8, 8).to(memory_format=torch.channels_last), torch.tensor([10, 500]),
            torch.randn(2, 5, 16))

    def loss_and_grads(fn):
        unet.zero_grad(set_to_none=True)
        loss = fn(*args).square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in unet.named_parameters()}

    ref_loss, ref = loss_and_grads(unet)
    assert ref_loss > 0.01
    torch._dynamo.reset()
    loss, grads = loss_and_grads(torch.compile(unet, fullgraph=True))
    torch._dynamo.reset()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    for name, g in ref.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-3, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


# The default method (ldm.norm.NHWC_STATS) here; the others in make test-slow (~60 s each on 2 cores).
@pytest.mark.parametrize("stats", [s if s == norm_module.NHWC_STATS else pytest.param(s, marks=pytest.mark.slow)
                                   for s in norm_module.STATS_METHODS])
def test_compiled_inference_unet_matches_eager(stats, monkeypatch):
    import ldm.norm

    monkeypatch.setattr(ldm.norm, "NHWC_STATS", stats)
    torch.manual_seed(0)
    # random weights: the zero-initialised output conv would make both outputs 0, whatever the graph computes
    unet = randomize_(UNetModel(**TINY)).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 8, 8).to(memory_format=torch.channels_last)
    args = (x, torch.tensor([10, 500]), torch.randn(2, 5, 16))
    torch._dynamo.reset()
    with torch.no_grad():
        ref = unet(*args)
        y = torch.compile(unet, fullgraph=True)(*args)  # inductor on the CPU, group_norm_nhwc in the graph
    torch._dynamo.reset()
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_compiled_skip_concatenation_stays_channels_last_on_gpu():
    """The decoder half's ResBlock input, cat([upsampled conv output, skip]), is written in channels_last by the
    compiled graph: inductor made it NCHW when the GroupNorm's reshape fixed its layout before the skip
    convolution asked for one (ResBlock normalizes first; group_norm_nhwc's stride request prevents it)."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    kw = dict(device="cuda", dtype=torch.float16)
    conv = nn.Conv2d(64, 64, 3, padding=1).to(**kw).to(memory_format=torch.channels_last).eval()
    block = ResBlock(96, 32, out_channels=64).to(**kw).to(memory_format=torch.channels_last).eval()
    h, skip = (torch.randn(2, c, 16, 16, **kw).to(memory_format=torch.channels_last) for c in (64, 32))
    emb = torch.randn(2, 32, **kw)

    def up(h: torch.Tensor, skip: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return block(torch.cat([conv(h), skip], dim=1), emb)

    torch._dynamo.reset()
    with torch.no_grad():
        ref = up(h, skip, emb)
        y, code = run_and_get_code(torch.compile(up, fullgraph=True), h, skip, emb)
    torch._dynamo.reset()
    nchw_cat = "empty_strided_cuda((2, 96, 16, 16), (24576, 256, 16, 1)"
    assert not any(nchw_cat in c for c in code), "the concatenation was written in NCHW"
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)


def test_autoencoder_norms_keep_one_step_statistics_and_the_unet_splits_them():
    """The U-Net's compiled norms sum four parts per group (``unbind`` of the parts), the autoencoder's use one
    Welford reduction per group (``var_mean``): the decode measured fastest so on an H200 (docs/BENCHMARKS.md)."""
    from ldm.autoencoder.model import Normalize

    x = torch.randn(2, 64, 8, 8).to(memory_format=torch.channels_last)
    with torch.no_grad():
        unet_norm = graph_targets(GroupNorm(32, 64), x)
        vae_norm = graph_targets(Normalize(64), x)
    assert "unbind" in unet_norm and "sum" in unet_norm, unet_norm
    assert "var_mean" in vae_norm and "unbind" not in vae_norm and "sum" not in vae_norm, vae_norm
    with pytest.raises(ValueError, match="stats must be one of .*'sums'"):
        GroupNorm(32, 64, stats="sums")
    with pytest.MonkeyPatch.context() as mp, pytest.raises(ValueError, match=r"ldm.norm.NHWC_STATS must be one of"):
        mp.setattr(norm_module, "NHWC_STATS", "sums")
        group_stats(torch.randn(1, 4, 2, 2))


def test_compiled_inference_decoder_matches_eager_with_the_autoencoders_statistics():
    """The decoder's compiled GroupNorms (group_norm_nhwc with ``ldm.autoencoder.model.NORM_STATS``, Welford) give
    eager's numbers: the path the fast sampler's decode takes."""
    from ldm.autoencoder.model import NORM_STATS, Decoder

    torch.manual_seed(0)
    dec = Decoder(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), out_ch=3, resolution=16,
                  z_channels=4).eval().to(memory_format=torch.channels_last)
    assert {m.stats for m in dec.modules() if isinstance(m, GroupNorm)} == {NORM_STATS}
    z = torch.randn(2, 4, 8, 8).to(memory_format=torch.channels_last)
    torch._dynamo.reset()
    with torch.no_grad():
        ref = dec(z)
        y = torch.compile(dec, fullgraph=True)(z)  # inductor on the CPU, group_norm_nhwc in the graph
    torch._dynamo.reset()
    assert y.shape == (2, 3, 16, 16)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
