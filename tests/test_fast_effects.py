"""What a user sees of ldm.fast.optimize called more than once: the last call decides how the model samples
(compiled with its settings, replayed from CUDA graphs, or eager), whatever an earlier call compiled."""
from __future__ import annotations

import collections

import pytest
import torch

import ldm
from ldm.cuda_graph import GraphedCall
from ldm.fast import optimize, uncompile

KW = dict(steps=2, height=32, width=32, seed=0, progress=False)


class FakeCompile:
    """torch.compile stand-in: the function itself, each call counted under the backend it was compiled with."""

    def __init__(self) -> None:
        self.calls: collections.Counter = collections.Counter()

    def __call__(self, fn, backend="inductor", **kwargs):
        def compiled(*args, **kw):
            self.calls[backend] += 1
            return fn(*args, **kw)

        return compiled


@pytest.fixture
def fake_compile(monkeypatch):
    fake = FakeCompile()
    monkeypatch.setattr(torch, "compile", fake)
    return fake


def test_an_eager_call_after_a_compiled_one_samples_eager(fake_compile):
    model = ldm.load(config="configs/tiny/txt2img.yaml")
    ref = model.generate("a red apple", output="tensor", **KW)
    optimize(model, backend="first", scope="denoiser", fuse_projections=False, compile_text=True)
    model.generate("a red apple", output="tensor", **KW)
    assert set(fake_compile.calls) == {"first"}  # U-Net, decoder, guided denoiser and text encoder compiled
    fake_compile.calls.clear()
    optimize(model, compile=False, fuse_projections=False, compile_text=True)  # compile_text needs compile
    out = model.generate("a red apple", output="tensor", **KW)
    assert not fake_compile.calls  # nothing compiled by the first call runs any more
    for obj in (model.unet, model.vae.decoder, model.guided_denoiser()):
        assert "forward" not in vars(obj)
    assert "encode_ids" not in vars(model.cond_stage_model)
    torch.testing.assert_close(out, ref)


def test_the_unet_graph_replaces_an_earlier_compile(fake_compile):
    model = ldm.load(config="configs/tiny/txt2img.yaml")
    optimize(model, backend="first", fuse_projections=False)
    optimize(model, compile=False, unet_graph=True, fuse_projections=False)
    assert isinstance(vars(model.unet)["forward"], GraphedCall)  # was: left compiled, "not graphed"
    model.generate("a red apple", output="latent", **KW)
    assert not fake_compile.calls


def test_a_second_compile_uses_its_own_settings_everywhere(fake_compile):
    model = ldm.load(config="configs/tiny/txt2img.yaml")
    optimize(model, backend="first", scope="denoiser", fuse_projections=False, compile_text=True)
    optimize(model, backend="second", scope="denoiser", fuse_projections=False, compile_text=True)
    model.generate("a red apple", output="tensor", **KW)
    assert set(fake_compile.calls) == {"second"}  # the denoiser and the text encoder were left on "first"
    fake_compile.calls.clear()
    optimize(model, backend="third", fuse_projections=False, compile_text=False)  # scope="unet": denoiser eager
    model.generate("a red apple", output="latent", **KW)
    assert set(fake_compile.calls) == {"third"}
    assert "forward" not in vars(model.guided_denoiser())


def test_uncompile_leaves_a_wrapper_put_there_since_by_someone_else(fake_compile):
    model = ldm.load(config="configs/tiny/txt2img.yaml")
    optimize(model, backend="first", fuse_projections=False, compile_text=False)
    mine = model.vae.decoder.forward = lambda x: x  # replaced after optimize by the user
    assert uncompile(model) == 1  # the U-Net's compiled forward
    assert "forward" not in vars(model.unet) and vars(model.vae.decoder)["forward"] is mine
    assert uncompile(model) == 0


def test_a_call_without_fused_projections_drops_an_earlier_calls_copies(fake_compile):
    """optimize(fuse_projections=False) after a fused call: the copies go (the log said "fused projections False"
    while the U-Net went on computing from copies that a later weight change would leave stale)."""
    from ldm.unet.attention import CrossAttention

    model = ldm.load(config="configs/tiny/txt2img.yaml")
    with torch.no_grad():  # the zero-initialised output layers would hide every other weight
        for p in model.unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    optimize(model, compile=False)
    attn = [m for m in model.unet.modules() if isinstance(m, CrossAttention)]
    assert any(m.fused_weight is not None for m in attn) and model.unet.hoist_kv_weight is not None
    optimize(model, compile=False, fuse_projections=False)
    assert all(m.fused_weight is None for m in attn) and model.unet.hoist_kv_weight is None
    with torch.no_grad():  # a weight changed in place now changes the output
        before = model.generate("a red apple", output="tensor", **KW)
        attn[0].to_q.weight.mul_(3.0)
        assert not torch.equal(model.generate("a red apple", output="tensor", **KW), before)
