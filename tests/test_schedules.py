"""Schedules, σ ↔ t maps, σ schedules and the denoiser wrapper, against golden numbers, diffusers and k-diffusion."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ldm.diffusion.denoiser import DiscreteDenoiser, get_scalings
from ldm.diffusion.samplers import sample
from ldm.diffusion.schedules import (DiscreteSchedule, ddim_timesteps, get_sigmas, ldm_schedule_buffers, make_betas,
                                     rescale_zero_terminal_snr, sigmas_ddim, sigmas_exponential, sigmas_karras)

import diffusers as df  # a dev dependency: missing means a broken install, not a skip
import k_diffusion.external as kext  # a dev dependency: missing means a broken install, not a skip
import k_diffusion.sampling as ks  # a dev dependency: missing means a broken install, not a skip

SD = DiscreteSchedule.from_betas(make_betas("linear"))


def test_sd_golden_numbers() -> None:
    assert SD.sigma_min == pytest.approx(0.0291672, abs=1e-6)
    assert SD.sigma_max == pytest.approx(14.614641, abs=1e-5)
    assert SD.alphas_cumprod.dtype == torch.float64 and len(SD) == 1000


@pytest.mark.parametrize("ours,theirs,kw", [
    ("linear", "scaled_linear", {}),
    ("linear_plain", "linear", dict(linear_start=1e-4, linear_end=0.02)),
    ("cosine", "squaredcos_cap_v2", {}),
])
def test_alphas_cumprod_match_diffusers(ours: str, theirs: str, kw: dict) -> None:
    betas = make_betas(ours, 1000, **kw)
    start, end = kw.get("linear_start", 0.00085), kw.get("linear_end", 0.012)
    ref = df.DDPMScheduler(num_train_timesteps=1000, beta_start=start, beta_end=end, beta_schedule=theirs)
    ac = torch.cumprod(1 - betas, 0)
    # diffusers computes in float32: agreement to float32 rounding
    torch.testing.assert_close(ac.float(), ref.alphas_cumprod, rtol=2e-6, atol=2e-7)
    torch.testing.assert_close(betas.float(), ref.betas, rtol=2e-5, atol=1e-8)


def test_ldm_buffers() -> None:
    """The 12 LDM buffers: golden values, and each one against diffusers' DDPMScheduler (T = 1000 steps)."""
    buf = ldm_schedule_buffers(make_betas("linear"))
    assert len(buf) == 12 and all(v.dtype == torch.float32 and v.shape == (1000,) for v in buf.values())
    ref = df.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)
    ac = ref.alphas_cumprod.double()
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    close = dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(buf["alphas_cumprod_prev"], ac_prev.float(), **close)
    torch.testing.assert_close(buf["sqrt_alphas_cumprod"], ac.sqrt().float(), **close)
    torch.testing.assert_close(buf["sqrt_one_minus_alphas_cumprod"], (1 - ac).sqrt().float(), rtol=1e-4, atol=0)
    torch.testing.assert_close(buf["log_one_minus_alphas_cumprod"], (1 - ac).log().float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(buf["sqrt_recip_alphas_cumprod"], ac.rsqrt().float(), **close)
    torch.testing.assert_close(buf["sqrt_recipm1_alphas_cumprod"], (1 / ac - 1).sqrt().float(), rtol=1e-4, atol=0)
    var = torch.stack([ref._get_variance(t) for t in range(1, 1000)])  # fixed_small = LDM posterior_variance
    torch.testing.assert_close(buf["posterior_variance"][1:], var, rtol=1e-4, atol=0)
    # diffusers' "fixed_small_log" returns exp(½ log max(β̃, 1e-20)), a standard deviation
    logv = 2 * torch.stack([ref._get_variance(t, variance_type="fixed_small_log") for t in range(1000)]).log()
    torch.testing.assert_close(buf["posterior_log_variance_clipped"], logv, rtol=1e-4, atol=1e-4)
    # posterior mean coefficients through one DDPM step on x0 ("sample" prediction), noise replayed
    x0, xt = torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3)
    ref = df.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                           prediction_type="sample")
    for t in (1, 500, 999):
        out = ref.step(x0, t, xt, generator=torch.Generator().manual_seed(t)).prev_sample
        z = torch.randn(xt.shape, generator=torch.Generator().manual_seed(t))
        mine = buf["posterior_mean_coef1"][t] * x0 + buf["posterior_mean_coef2"][t] * xt \
            + buf["posterior_variance"][t].sqrt() * z
        torch.testing.assert_close(mine, out, rtol=1e-4, atol=1e-4)  # diffusers: β_t = 1 − ᾱ_t/ᾱ_{t−1} in float32
    # golden values of the original buffers
    assert buf["posterior_variance"][0] == 0 and buf["posterior_log_variance_clipped"][0] == pytest.approx(-46.0517)
    assert buf["sqrt_recipm1_alphas_cumprod"][-1].item() == pytest.approx(14.614641, abs=1e-4)
    assert buf["betas"][0].item() == pytest.approx(0.00085, rel=1e-6)
    assert buf["betas"][-1].item() == pytest.approx(0.012, rel=1e-6)


def test_sigma_t_maps_match_k_diffusion() -> None:
    ref = kext.DiscreteSchedule(SD.sigmas.float(), quantize=False)
    sig = torch.cat([torch.logspace(math.log10(0.03), math.log10(14.6), 97), SD.sigmas[[0, 1, 500, 999]].float()])
    torch.testing.assert_close(SD.sigma_to_t(sig).float(), ref.sigma_to_t(sig), rtol=0, atol=2e-3)
    torch.testing.assert_close(SD.sigma_to_t(sig, quantize=True).long(), ref.sigma_to_t(sig, quantize=True))
    t = torch.linspace(0, 999, 113)
    torch.testing.assert_close(SD.t_to_sigma(t).float(), ref.t_to_sigma(t), rtol=1e-5, atol=0)
    torch.testing.assert_close(SD.sigma_to_t(SD.t_to_sigma(t)), t.double(), rtol=0, atol=1e-9)  # round trip
    assert SD.sigma_to_t(torch.tensor([0.0, 1e3])).tolist() == [0.0, 999.0]  # clamped outside the table


def test_karras() -> None:
    s = sigmas_karras(10, 0.0292, 14.6146, rho=7.0)
    assert s.shape == (11,) and s[-1] == 0
    assert s[0].item() == pytest.approx(14.6146) and s[-2].item() == pytest.approx(0.0292)
    inv = s[:-1] ** (1 / 7)  # σ^{1/ρ} is evenly spaced
    torch.testing.assert_close(inv.diff(), inv.diff()[:1].expand(9), rtol=1e-9, atol=0)
    torch.testing.assert_close(s.float(), ks.get_sigmas_karras(10, 0.0292, 14.6146, 7.0), rtol=1e-6, atol=0)
    rho3 = sigmas_karras(10, 0.0292, 14.6146, rho=3.0)
    assert not torch.allclose(rho3, s)
    torch.testing.assert_close(rho3.float(), ks.get_sigmas_karras(10, 0.0292, 14.6146, 3.0), rtol=3e-6, atol=0)


def test_get_sigmas_kinds() -> None:
    torch.testing.assert_close(get_sigmas(SD, 15, "discrete"), kext.DiscreteSchedule(SD.sigmas.float(), False)
                               .get_sigmas(15), rtol=1e-5, atol=0)
    torch.testing.assert_close(get_sigmas(SD.alphas_cumprod, 15, "exponential"),
                               ks.get_sigmas_exponential(15, SD.sigma_min, SD.sigma_max), rtol=1e-5, atol=0)
    torch.testing.assert_close(sigmas_exponential(5, 0.1, 10.0)[:-1].log().diff(), torch.full((4,), -math.log(10) / 2,
                               dtype=torch.float64))
    karras = get_sigmas(SD, 20, "karras")
    assert karras.dtype == torch.float32 and karras[0] == pytest.approx(SD.sigma_max) and karras[-1] == 0
    with pytest.raises(ValueError, match="kind"):
        get_sigmas(SD, 10, "cosine")
    with pytest.raises(ValueError, match="steps"):
        get_sigmas(SD, 0, "karras")


@pytest.mark.parametrize("steps", [10, 30, 50])
def test_ddim_sigmas_match_diffusers(steps: int) -> None:
    """"leading" + steps_offset=1 timesteps; the last step goes to ᾱ_0 (set_alpha_to_one=False), as the original."""
    ref = df.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                           timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)
    ref.set_timesteps(steps)
    assert ddim_timesteps(1000, steps).tolist() == ref.timesteps.tolist()
    ac = torch.cat([ref.alphas_cumprod[ref.timesteps], ref.final_alpha_cumprod.reshape(1)]).double()
    torch.testing.assert_close(get_sigmas(SD, steps, "ddim").double(), ((1 - ac) / ac).sqrt(), rtol=1e-4, atol=0)
    assert sigmas_ddim(SD, steps, set_alpha_to_one=True)[-1] == 0
    if 1000 % steps == 0:  # the original make_ddim_timesteps: range(0, 1000, 1000 // S) + 1
        assert sorted(ddim_timesteps(1000, steps).tolist()) == [t + 1 for t in range(0, 1000, 1000 // steps)]


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [7, 10, 30, 48, 50, 96, 600, 999])  # 48, 96: ties at .5; 1000: diffusers asks t = 1000
def test_spaced_sigmas_match_diffusers_euler(spacing: str, steps: int) -> None:
    """diffusers' Euler/Heun/LMS σ with SD's config: the table's σ at its "leading"/"trailing" timesteps, then 0."""
    from ldm.diffusion.schedules import spaced_timesteps

    ref = df.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    timestep_spacing=spacing, steps_offset=1)
    ref.set_timesteps(steps)
    if spacing == "leading" and 500 < steps < 999:  # diffusers stops at t = S (stride 1): refused here, by design
        assert int(ref.timesteps[0]) == steps
        with pytest.raises(ValueError, match="leading timesteps"):
            spaced_timesteps(1000, steps, spacing)
        return
    assert spaced_timesteps(1000, steps, spacing).tolist() == ref.timesteps.long().tolist()
    torch.testing.assert_close(get_sigmas(ref.alphas_cumprod.double(), steps, spacing), ref.sigmas,
                               rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="spacing"):
        spaced_timesteps(1000, steps, "linspace")


def test_zero_terminal_snr() -> None:
    """ᾱ_T = 0 exactly (σ_T = ∞) is kept in alphas_cumprod; σ tables clamp ᾱ at 2⁻²⁴ so σ_max ≈ 4096 is finite."""
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as ref_rescale

    betas = rescale_zero_terminal_snr(make_betas("linear"))
    torch.testing.assert_close(betas, ref_rescale(make_betas("linear")), rtol=1e-12, atol=0)  # same math, float64
    ref = df.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                           rescale_betas_zero_snr=True)  # float32 inside
    torch.testing.assert_close(torch.cumprod(1 - betas, 0).float(), ref.alphas_cumprod, rtol=1e-5, atol=1e-7)
    s = DiscreteSchedule.from_betas(betas)
    assert s.alphas_cumprod[-1] == 0 and betas[-1] == 1
    assert s.alphas_cumprod[0] == pytest.approx(SD.alphas_cumprod[0].item(), rel=1e-12)  # first step unchanged
    assert math.isfinite(s.sigma_max) and s.sigma_max == pytest.approx(4096, rel=1e-3)
    assert s.sigma_to_t(torch.tensor([s.sigma_max, 1e9])).tolist() == [999.0, 999.0]
    for kind in ("karras", "discrete", "exponential", "ddim"):
        assert torch.isfinite(get_sigmas(s, 10, kind)).all(), kind
    D = DiscreteDenoiser(lambda x, t: -x, s.alphas_cumprod, parameterization="v")  # v = −x_vp, D finite
    sig = get_sigmas(s, 8, "karras")
    out = sample("dpmpp_2m", D, torch.randn(2, 4, 3, 3) * sig[0], sig, disable=True)
    assert torch.isfinite(out).all()
    buf = ldm_schedule_buffers(betas)  # as the original: inf where it divides by ᾱ_T = 0, no exception
    assert buf["alphas_cumprod"][-1] == 0 and math.isinf(buf["sqrt_recip_alphas_cumprod"][-1].item())


class Lin(nn.Module):
    def __init__(self, C: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv(x) * (1 + t.reshape(-1, 1, 1, 1).to(x.dtype) / 1000)
        return out if context is None else out + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("param,kcls", [("eps", "DiscreteEpsDDPMDenoiser"), ("v", "DiscreteVDDPMDenoiser")])
@pytest.mark.parametrize("quantize", [False, True])
def test_denoiser_matches_k_diffusion(param: str, kcls: str, quantize: bool) -> None:
    torch.manual_seed(0)
    net = Lin()
    ours = DiscreteDenoiser(net, SD.alphas_cumprod, parameterization=param, quantize=quantize)
    theirs = getattr(kext, kcls)(net, SD.alphas_cumprod.float(), quantize=quantize)
    x, sigma = torch.randn(3, 4, 5, 5), torch.tensor([0.05, 1.3, 14.0])
    torch.testing.assert_close(ours(x, sigma), theirs(x, sigma), rtol=1e-5, atol=1e-5)


def test_denoiser_x0_and_dtypes() -> None:
    net = Lin()
    x, sigma = torch.randn(2, 4, 3, 3), torch.tensor([0.5, 3.0])
    D = DiscreteDenoiser(net, SD.alphas_cumprod, parameterization="x0")
    t = SD.sigma_to_t(sigma).float()
    torch.testing.assert_close(D(x, sigma), net(x / (sigma**2 + 1).sqrt().reshape(-1, 1, 1, 1), t))
    ctx = torch.randn(2, 7, 8)
    net16 = Lin().to(torch.bfloat16)  # cast at the network boundary: bf16 in, x's dtype out
    seen = {}
    net16.register_forward_pre_hook(lambda m, a, kw: seen.update(x=a[0].dtype, c=kw["context"].dtype),
                                    with_kwargs=True)
    out = DiscreteDenoiser(net16, SD.alphas_cumprod)(x, 1.0, context=ctx)  # scalar σ is broadcast
    assert out.dtype == torch.float32 and seen == {"x": torch.bfloat16, "c": torch.bfloat16}
    c_skip, c_out, c_in = get_scalings(torch.tensor([2.0]), "v")
    assert (c_skip.item(), c_out.item(), c_in.item()) == pytest.approx((0.2, -2 / math.sqrt(5), 1 / math.sqrt(5)))
    with pytest.raises(ValueError, match="parameterization"):
        DiscreteDenoiser(net, SD.alphas_cumprod, parameterization="score")


def test_make_betas_errors() -> None:
    with pytest.raises(ValueError, match="kind"):
        make_betas("quadratic")
    with pytest.raises(ValueError, match="n must be"):
        make_betas("linear", 1)
    with pytest.raises(ValueError, match="alphas_cumprod"):
        DiscreteSchedule(torch.ones(3, 3))
