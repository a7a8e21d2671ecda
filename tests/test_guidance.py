"""Classifier-free guidance: one batched call, the formula over all channels, rescale, the scale-1 shortcut."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ldm.diffusion.denoiser import DiscreteDenoiser
from ldm.diffusion.guidance import CFGDenoiser, rescale_guidance
from ldm.diffusion.schedules import make_betas

AC = torch.cumprod(1 - make_betas("linear"), 0)


class CondNet(nn.Module):
    """A 4-channel ε-net with 9 input channels (x ‖ concat, like SD inpainting), cross-attention-like context use and
    an ADM vector y; every output channel depends on the conditioning. Counts its calls and batch sizes."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(4, 9, generator=g) * 0.3)
        self.proj = nn.Parameter(torch.randn(8, 4, generator=g))
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, concat: torch.Tensor,
                y: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        h = torch.einsum("oc,bchw->bohw", self.w, torch.cat([x, concat], 1))  # (B, 4, h, w)
        c = (context.mean(1) @ self.proj)[:, :, None, None]  # (B, 4, 1, 1)
        return h + c * torch.tanh(h) + y[:, :4, None, None]


def _inputs(B: int = 2):
    g = torch.Generator().manual_seed(1)
    x, sigma = torch.randn(B, 4, 5, 5, generator=g) * 3, torch.tensor([3.0, 0.7])[:B]
    concat = torch.randn(B, 5, 5, 5, generator=g)
    cond = {"context": torch.randn(B, 7, 8, generator=g), "concat": concat, "y": torch.randn(B, 6, generator=g)}
    uncond = {"context": torch.zeros(B, 7, 8), "concat": concat, "y": torch.zeros(B, 6)}
    return x, sigma, cond, uncond


def test_one_batched_call_and_formula_on_all_channels() -> None:
    net = CondNet()
    D = DiscreteDenoiser(net, AC)
    x, sigma, cond, uncond = _inputs()
    out = CFGDenoiser(D)(x, sigma, cond, uncond, scale=7.5)
    assert net.calls == [4]  # one call, batch 2B
    d_c, d_u = D(x, sigma, **cond), D(x, sigma, **uncond)
    torch.testing.assert_close(out, d_u + 7.5 * (d_c - d_u), rtol=1e-5, atol=1e-5)
    assert ((d_c - d_u).abs().flatten(2).amax(2) > 1e-3).all()  # every channel of every image is guided


def test_scale_one_skips_uncond() -> None:
    net = CondNet()
    D = DiscreteDenoiser(net, AC)
    x, sigma, cond, uncond = _inputs()
    out = CFGDenoiser(D)(x, sigma, cond, uncond, scale=1.0)
    assert net.calls == [2]
    torch.testing.assert_close(out, D(x, sigma, **cond))


def test_rescale_matches_diffusers_formula() -> None:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    g = torch.Generator().manual_seed(2)
    cfg, pos = torch.randn(3, 4, 6, 6, generator=g) * 4, torch.randn(3, 4, 6, 6, generator=g)
    for phi in (0.0, 0.3, 0.7, 1.0):
        torch.testing.assert_close(rescale_guidance(cfg, pos, phi), rescale_noise_cfg(cfg, pos, phi))
    full = rescale_guidance(cfg, pos, 1.0)  # φ = 1: each sample's std equals the conditional prediction's
    torch.testing.assert_close(full.flatten(1).std(1), pos.flatten(1).std(1))


def test_rescale_applied_to_x0_prediction() -> None:
    net = CondNet()
    D = DiscreteDenoiser(net, AC)
    x, sigma, cond, uncond = _inputs()
    out = CFGDenoiser(D)(x, sigma, cond, uncond, scale=5.0, rescale=0.7)
    d_c, d_u = D(x, sigma, **cond), D(x, sigma, **uncond)
    torch.testing.assert_close(out, rescale_guidance(d_u + 5.0 * (d_c - d_u), d_c, 0.7), rtol=1e-5, atol=1e-5)


def test_bad_inputs() -> None:
    D = DiscreteDenoiser(CondNet(), AC)
    x, sigma, cond, uncond = _inputs()
    with pytest.raises(ValueError, match="same keys"):
        CFGDenoiser(D)(x, sigma, cond, {"context": uncond["context"]}, scale=3.0)
    with pytest.raises(ValueError, match="rescale"):
        CFGDenoiser(D)(x, sigma, cond, uncond, scale=3.0, rescale=1.5)


def _tiny_guided():
    """The tiny text-to-image config's U-Net behind DiscreteDenoiser and CFGDenoiser, in fp32, random weights."""
    import ldm
    from test_unet import randomize_

    model = ldm.load(config="configs/tiny/txt2img.yaml", device="cpu").float().eval()
    randomize_(model.model.diffusion_model)
    unet = model.model.diffusion_model
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, unet.in_channels, 8, 8, generator=g) * 5
    width = unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features  # the text embedding's
    ctx = lambda: torch.randn(2, 7, width, generator=g)  # noqa: E731
    return model, unet, x, torch.tensor([5.0, 0.4]), {"context": ctx()}, {"context": ctx()}


@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_cfg_shares_x_between_the_branches_and_equals_the_batched_call(rescale) -> None:
    """Both branches see the same x_t and σ: D_cfg asks the U-Net for repeat=2 (its layers before the first
    cross-attention run once), and the result equals the batched call [x; x] with [uncond; cond]."""
    model, unet, x, sigma, cond, uncond = _tiny_guided()
    guided = CFGDenoiser(model.denoiser())
    assert guided.inner_model.supports_repeat
    batches: list[int] = []
    unet.input_blocks[0].register_forward_hook(lambda m, a, o: batches.append(o.shape[0]))
    with torch.no_grad():
        out = guided(x, sigma, cond, uncond, scale=6.0, rescale=rescale)
        d = model.denoiser()(torch.cat([x, x]), torch.cat([sigma, sigma]),
                             context=torch.cat([uncond["context"], cond["context"]]))
    d_u, d_c = d.chunk(2)
    ref = rescale_guidance(d_u + 6.0 * (d_c - d_u), d_c, rescale)
    assert batches == [2, 4]  # the shared call, then the spelled-out reference
    assert (out - ref).abs().max() < 1e-5 * ref.abs().max()


def test_cfg_batches_both_branches_when_more_than_the_context_differs() -> None:
    """Another input that differs between the branches (here the inpainting concat) means different x for the
    U-Net: the batched call, as before."""
    model, unet, x, sigma, cond, uncond = _tiny_guided()
    from ldm.diffusion.guidance import _shared_cond

    den = model.denoiser()
    a, b = torch.zeros(2, 1), torch.zeros(2, 1)
    assert _shared_cond(den, {**cond, "concat": a}, {**uncond, "concat": a})["concat"] is a
    assert _shared_cond(den, {**cond, "concat": a}, {**uncond, "concat": b}) is None
    assert _shared_cond(den, cond, {**uncond, "y": a}) is None  # different keys
    assert _shared_cond(DiscreteDenoiser(CondNet(), AC), cond, uncond) is None  # a network without repeat
