"""The training loss: noising and targets against diffusers, min-SNR weights, determinism, offset noise, and the
loss/denoiser consistency (a network with zero loss is an exact denoiser for every parameterization)."""
from __future__ import annotations

import pytest
import torch

from ldm.diffusion.denoiser import DiscreteDenoiser, eps_from_output, target_from_x0_eps, x0_from_output
from ldm.diffusion.losses import diffusion_loss, min_snr_weight, sample_noise
from ldm.diffusion.schedules import DiscreteSchedule, make_betas, rescale_zero_terminal_snr

import diffusers as df  # a dev dependency: missing means a broken install, not a skip
AC = torch.cumprod(1 - make_betas("linear"), 0)
PARAMS = ["eps", "v", "x0"]


class Recorder:
    """A network that records its inputs and returns a fixed output."""

    def __init__(self, out: torch.Tensor | None = None) -> None:
        self.out, self.seen = out, {}

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        self.seen = {"x": x, "t": t, **cond}
        return torch.zeros_like(x) if self.out is None else self.out


def test_noising_and_targets_match_diffusers() -> None:
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 3, 3, generator=g), torch.randn(4, 4, 3, 3, generator=g)
    t = torch.tensor([0, 17, 500, 999])
    ref = df.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    for p, target in [("eps", noise), ("x0", x0), ("v", ref.get_velocity(x0, noise, t))]:
        net = Recorder()
        loss = diffusion_loss(net, x0, {"context": torch.ones(4, 2)}, AC, p, timesteps=t, noise=noise)
        torch.testing.assert_close(net.seen["x"], ref.add_noise(x0, noise, t), rtol=1e-5, atol=1e-6)
        assert net.seen["t"].tolist() == t.tolist() and net.seen["t"].dtype == torch.int64
        assert torch.equal(net.seen["context"], torch.ones(4, 2))
        torch.testing.assert_close(loss, target.pow(2).flatten(1).mean(1), rtol=1e-5, atol=1e-6)  # F = 0
        perfect = diffusion_loss(Recorder(target), x0, {}, AC, p, timesteps=t, noise=noise)
        assert perfect.abs().max() < 1e-10, p


def test_v_target_formula() -> None:
    """v = α ε − σ x0 with α = √ᾱ, σ = √(1−ᾱ) (Salimans & Ho 2022)."""
    x0, eps, a = torch.randn(2, 3), torch.randn(2, 3), torch.tensor([[0.81], [0.36]])
    v = target_from_x0_eps("v", x0, eps, a)
    torch.testing.assert_close(v, a.sqrt() * eps - (1 - a).sqrt() * x0)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    for p in PARAMS:  # the conversions invert each other
        out = target_from_x0_eps(p, x0, eps, a)
        torch.testing.assert_close(x0_from_output(p, out, x_t, a), x0)
        torch.testing.assert_close(eps_from_output(p, out, x_t, a), eps)


@pytest.mark.parametrize("p", PARAMS)
def test_zero_loss_network_is_exact_denoiser(p: str) -> None:
    """A network that outputs the loss's target (knowing x0, ε) makes D(x0 + σ ε, σ) = x0: losses ↔ denoiser agree."""
    s = DiscreteSchedule(AC)
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)

    def oracle(x_vp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = AC[t.round().long()].reshape(-1, 1, 1, 1).float()
        return target_from_x0_eps(p, x0, eps, a)

    sigma = s.sigmas[[3, 400, 990]].float()
    D = DiscreteDenoiser(oracle, AC, parameterization=p)
    torch.testing.assert_close(D(x0 + sigma.reshape(-1, 1, 1, 1) * eps, sigma), x0, rtol=1e-4, atol=1e-4)


def test_min_snr_weights() -> None:
    snr = torch.tensor([0.01, 1.0, 5.0, 100.0])
    gamma = 5.0
    # the definition (Hang et al. 2023): x0-weight min(SNR, γ), divided by SNR (ε) or SNR + 1 (v)
    torch.testing.assert_close(min_snr_weight(snr, gamma, "x0"), torch.minimum(snr, torch.tensor(gamma)))
    torch.testing.assert_close(min_snr_weight(snr, gamma, "eps"), torch.minimum(snr, torch.tensor(gamma)) / snr)
    torch.testing.assert_close(min_snr_weight(snr, gamma, "v"), torch.minimum(snr, torch.tensor(gamma)) / (snr + 1))
    assert min_snr_weight(torch.tensor([0.0]), gamma, "eps").item() == 1.0  # zero terminal SNR: no NaN
    assert min_snr_weight(torch.tensor([0.0]), gamma, "v").item() == 0.0
    # applied in the loss: weight × unweighted loss, SNR = ᾱ/(1 − ᾱ)
    x0, noise, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.tensor([10, 900])
    plain = diffusion_loss(Recorder(), x0, {}, AC, "eps", timesteps=t, noise=noise)
    weighted = diffusion_loss(Recorder(), x0, {}, AC, "eps", timesteps=t, noise=noise, min_snr_gamma=gamma)
    snr_t = (AC[t] / (1 - AC[t])).float()
    torch.testing.assert_close(weighted, plain * torch.clamp(gamma / snr_t, max=1.0))


def test_zero_terminal_snr_loss_is_finite() -> None:
    ac = torch.cumprod(1 - rescale_zero_terminal_snr(make_betas("linear")), 0)
    x0 = torch.randn(2, 4, 3, 3)
    for p in PARAMS:
        loss = diffusion_loss(Recorder(), x0, {}, ac, p, timesteps=torch.tensor([999, 0]), min_snr_gamma=5.0)
        assert torch.isfinite(loss).all(), p


def test_determinism_with_generator() -> None:
    x0 = torch.randn(8, 4, 4, 4)
    net = Recorder()
    a = diffusion_loss(net, x0, {}, AC, "v", generator=torch.Generator().manual_seed(3), offset_noise=0.1)
    t_a = net.seen["t"].clone()
    b = diffusion_loss(net, x0, {}, AC, "v", generator=torch.Generator().manual_seed(3), offset_noise=0.1)
    assert torch.equal(a, b) and torch.equal(t_a, net.seen["t"]) and a.shape == (8,)
    c = diffusion_loss(net, x0, {}, AC, "v", generator=torch.Generator().manual_seed(4), offset_noise=0.1)
    assert not torch.equal(a, c)


def test_offset_noise() -> None:
    """Offset noise adds a per-(sample, channel) constant of std `offset`: the spatial means' variance grows by it."""
    g = torch.Generator().manual_seed(0)
    plain = sample_noise((512, 4, 8, 8), 0.0, g).mean(dim=(2, 3))  # (B, C), var 1/64
    off = sample_noise((512, 4, 8, 8), 0.5, g).mean(dim=(2, 3))  # var 1/64 + 0.25
    assert plain.var().item() == pytest.approx(1 / 64, rel=0.1)
    assert off.var().item() == pytest.approx(1 / 64 + 0.25, rel=0.1)


def test_bad_parameterization() -> None:
    with pytest.raises(ValueError, match="parameterization"):
        diffusion_loss(Recorder(), torch.zeros(1, 1, 1, 1), {}, AC, "score")
