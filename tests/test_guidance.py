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
