"""train.channels_last: when it is on, that it trains like NCHW, and that a resume in the other layout keeps fused
AdamW's moments aligned with their parameters."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.cli.train import run
from ldm.training.layout import match_optimizer_state, wants_channels_last
from ldm.training.logs import logged

TINY = "configs/tiny/txt2img.yaml"
CL = torch.channels_last


@pytest.mark.parametrize("train,device,expected", [
    ({}, "cuda", False), ({"compile": True}, "cuda", True), ({"compile": True}, "cpu", False),
    ({"compile": "aot_eager", "channels_last": None}, "cuda", True), ({"channels_last": True}, "cpu", True),
    ({"compile": True, "channels_last": False}, "cuda", False)])
def test_default_follows_compile_on_cuda(train, device, expected):
    assert wants_channels_last(OmegaConf.create(train), torch.device(device)) is expected


def test_bad_value_names_the_key():
    with pytest.raises(ValueError, match="train.channels_last"):
        wants_channels_last(OmegaConf.create({"channels_last": "yes"}), torch.device("cpu"))


def _two_fused_steps(param_fmt, state_fmt, fix: bool) -> torch.Tensor:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 4, 3, 3).to(memory_format=param_fmt))
    opt = torch.optim.AdamW([p], lr=1e-2, fused=True)
    g = torch.randn(8, 4, 3, 3)
    p.grad = g.clone().to(memory_format=param_fmt)
    opt.step()
    for k in ("exp_avg", "exp_avg_sq"):  # as if restored from a checkpoint saved in the other layout
        opt.state[p][k] = opt.state[p][k].contiguous(memory_format=state_fmt)
    if fix:
        assert match_optimizer_state(opt) == (2 if param_fmt != state_fmt else 0)
    p.grad = (0.5 * g + 1).contiguous(memory_format=param_fmt)
    opt.step()
    return p.detach().clone()


def test_fused_adamw_needs_moments_in_the_parameter_layout():
    ref = _two_fused_steps(torch.contiguous_format, torch.contiguous_format, fix=False)
    broken = _two_fused_steps(CL, torch.contiguous_format, fix=False)
    assert not torch.allclose(broken, ref, atol=1e-4)  # why match_optimizer_state exists: a silent wrong update
    fixed = _two_fused_steps(CL, torch.contiguous_format, fix=True)
    torch.testing.assert_close(fixed, ref, atol=1e-6, rtol=0)


def _losses(run_dir: Path) -> dict[int, float]:
    return {k: float(v) for k, v in logged(run_dir, "train/loss").items()}


def test_channels_last_training_matches_nchw_and_resumes_in_the_other_layout(tmp_path, caplog):
    common = ["--config", TINY, "trainer.log_every_n_steps=1", "train.checkpoint.every_n_steps=2",
              "train.checkpoint.keep_last=10"]
    run(common + ["--run-dir", str(tmp_path / "nchw"), "trainer.max_steps=4"])
    run(common + ["--run-dir", str(tmp_path / "cl"), "trainer.max_steps=4", "train.channels_last=true"])
    sd = torch.load(tmp_path / "cl" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    convs = {k: v for k, v in sd.items() if ("diffusion_model" in k or k.startswith("model_ema")) and v.dim() == 4
             and v.shape[-1] == 3 and v.shape[1] > 1}  # the U-Net and its EMA (the autoencoder is frozen)
    assert convs and all(v.is_contiguous(memory_format=CL) and not v.is_contiguous() for v in convs.values())
    nchw, cl = _losses(tmp_path / "nchw"), _losses(tmp_path / "cl")
    assert nchw.keys() == cl.keys() and len(nchw) == 4
    assert all(cl[k] == pytest.approx(nchw[k], rel=1e-4) for k in nchw)
    # stop the channels_last run at step 2, then resume it in NCHW: the same losses as straight through
    part = tmp_path / "switch"
    run(common + ["--run-dir", str(part), "trainer.max_steps=2", "train.channels_last=true"])
    with caplog.at_level("INFO", logger="ldm.training.layout"):
        run(common + ["--run-dir", str(part), "trainer.max_steps=4", "train.channels_last=false", "--resume", "auto"])
    assert "re-laid out to match" in caplog.text  # the restored moments were channels_last, the weights are not
    switched = _losses(part)
    after = sorted(cl)[-2:]  # the two steps taken after the resume (the resumed run's log holds only those)
    assert all(switched[k] == pytest.approx(cl[k], rel=1e-4) for k in after), (switched, cl)


def _traced_backward(module: torch.nn.Module, *inputs: torch.Tensor) -> torch.fx.GraphModule:
    """The backward graph that torch.compile's AOT autograd traces for ``module(*inputs)`` (inductor's
    decompositions, nothing compiled), run once so that it is traced."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    graphs = []
    backend = aot_autograd(fw_compiler=lambda gm, _: gm, bw_compiler=lambda gm, _: graphs.append(gm) or gm,
                           decompositions=select_decomp_table())
    torch._dynamo.reset()
    out = torch.compile(module, backend=backend, dynamic=False)(*inputs)
    out.backward(torch.ones_like(out))
    torch._dynamo.reset()
    return graphs[-1]


def _channels_last_conv_grads(bw: torch.fx.GraphModule) -> int:
    """Asserts that each convolution_backward of ``bw`` takes a channels_last input and gradient; their count."""
    from ldm.norm import is_channels_last

    calls = [n for n in bw.graph.nodes if n.target is torch.ops.aten.convolution_backward.default]
    for n in calls:
        grad_output, inp = (a.meta["val"] for a in n.args[:2])
        assert is_channels_last(inp) and is_channels_last(grad_output), n.format_node()
    return len(calls)


def test_traced_training_gradients_keep_channels_last_through_a_transformers_residual():
    """A SpatialTransformer's residual (``film(h, x)`` with one group) must hand its input a channels_last gradient
    in the traced backward: an NCHW one (the sum over a size-1 group dimension that the (G, B, ...) view made) reached
    every convolution_backward upstream as a layout conversion. Here the conv before the transformer is the witness:
    its convolution_backward must get the gradient in its input's layout."""
    from ldm.unet.attention import SpatialTransformer

    torch.manual_seed(0)
    cl = torch.channels_last
    conv = torch.nn.Conv2d(64, 64, 3, padding=1)
    model = torch.nn.Sequential(conv, SpatialTransformer(64, 4, 16)).to(memory_format=cl)
    x = torch.randn(2, 64, 8, 8).to(memory_format=cl).requires_grad_()
    assert _channels_last_conv_grads(_traced_backward(model, x)) == 3  # proj_out, proj_in, the conv in front


def test_traced_training_gradients_keep_channels_last_through_an_upsampler():
    """The U-Net's Upsample (nearest ×2, then its conv) must hand the conv in front of it a channels_last gradient in
    the traced backward: inductor's decomposition of upsample_nearest2d's backward (an index_put onto a fresh NCHW
    zero tensor) gave it NCHW, and the convolution_backward before it converted."""
    from ldm.unet.blocks import Upsample

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(32, 32, 3, padding=1), Upsample(32, use_conv=True))
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 32, 8, 8).to(memory_format=torch.channels_last).requires_grad_()
    assert _channels_last_conv_grads(_traced_backward(model, x)) == 2


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_upsample_backward_equals_interpolates(layout):
    """ldm.resample's ×2 backward (the sum of the four strided views) gives F.interpolate's gradient, in the
    incoming gradient's layout, compiled and eager (eager is F.interpolate itself)."""
    from ldm.resample import _Upsample2x, upsample_nearest

    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 7, dtype=torch.float64).to(memory_format=layout).requires_grad_()
    g = torch.randn(2, 8, 10, 14, dtype=torch.float64).to(memory_format=layout)
    (want,) = torch.autograd.grad(torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"), x, g)
    (got,) = torch.autograd.grad(_Upsample2x.apply(x), x, g)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert got.is_contiguous(memory_format=layout)
    torch._dynamo.reset()
    (compiled,) = torch.autograd.grad(torch.compile(upsample_nearest, backend="aot_eager")(x), x, g)
    torch.testing.assert_close(compiled, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(upsample_nearest(x), torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"))
    torch._dynamo.reset()


@pytest.mark.parametrize("split", [False, True])
def test_traced_geglu_backward_concatenates_only_without_the_split(monkeypatch, split):
    """chunk's backward is a concatenation of the two halves' gradients (inductor writes it as one masked kernel that
    evaluates both halves' formulas for every element); with GEGLU_SPLIT_GRAD the traced backward has none at the
    projection's width, the two gradients going to their own matmuls."""
    import ldm.unet.attention as attn

    monkeypatch.setattr(attn, "GEGLU_SPLIT_GRAD", split)
    torch.manual_seed(0)
    x = torch.randn(2, 16, 8, requires_grad=True)
    bw = _traced_backward(attn.GEGLU(8, 12), x)
    cats = [n for n in bw.graph.nodes if n.target is torch.ops.aten.cat.default
            and n.meta["val"].shape == (2, 16, 24)]  # not the parameters' small (24, 8) and (24,) gradients
    assert len(cats) == (0 if split else 1), [n.format_node() for n in cats]


class _NCHWTail(torch.nn.Module):
    """y -> y·w with an NCHW w: the product's gradient with respect to y comes back NCHW in the traced backward."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(shape))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y.contiguous() * self.w


@pytest.mark.parametrize("force", [False, True])
def test_traced_conv_backward_takes_a_channels_last_gradient(monkeypatch, force):
    """ldm.unet.conv.Conv2d hands its convolution_backward a channels_last gradient in a compiled backward even where
    the ops after it return an NCHW one (on CUDA, inductor's GroupNorm-backward kernels: 25 conversions per SD-1.5
    step); without GRAD_CHANNELS_LAST the NCHW gradient reaches it. The gradients' values are nn.Conv2d's."""
    import ldm.unet.conv as conv
    from ldm.norm import is_channels_last

    monkeypatch.setattr(conv, "GRAD_CHANNELS_LAST", force)
    torch.manual_seed(0)
    model = torch.nn.Sequential(conv.Conv2d(8, 16, 3, padding=1), _NCHWTail((2, 16, 6, 6)))
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 6, 6).to(memory_format=torch.channels_last).requires_grad_()
    bw = _traced_backward(model, x)
    (call,) = [n for n in bw.graph.nodes if n.target is torch.ops.aten.convolution_backward.default]
    assert is_channels_last(call.args[0].meta["val"]) == force, call.format_node()
    grads = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
    model.zero_grad(set_to_none=True)
    x.grad = None
    model(x).backward(torch.ones(2, 16, 6, 6))  # eager: nn.Conv2d's own path
    for got, want in zip(grads, [p.grad for p in model.parameters()] + [x.grad]):
        torch.testing.assert_close(got, want)
