"""Samplers: exact Gaussian targets, equality with k-diffusion and with diffusers' schedulers.

Measured max |ours − reference| (CPU, float32, a (2, 4, 6, 6) batch through the toy ε-model below, 12 steps, outputs
of magnitude 1.4–5; asserted bounds: 5e-6 vs k-diffusion, 1e-5 vs diffusers):
    vs k-diffusion 0.1.1.post1 (same DiscreteDenoiser, same Karras σ, same noise sequence):
        euler 0, euler_ancestral 4.0e-07, heun 0, lms 9.5e-07, dpmpp_2m 1.2e-06, dpmpp_2m_sde 4.2e-07,
        dpmpp_2s_ancestral 3.6e-07
    vs diffusers 0.42.1 (SD config: scaled_linear; leading spacing + steps_offset=1 where the scheduler has it;
    same start noise and the same step-noise sequence; VP ↔ σ-space converted at start and end):
        DDIMScheduler η=0 1.4e-06, η=0.7 1.4e-06, DDPMScheduler 9.5e-07, PNDMScheduler(skip_prk_steps) as plms
        7.2e-07, EulerDiscrete 4.8e-07, EulerAncestralDiscrete 9.5e-07, HeunDiscrete 6.0e-07, LMSDiscrete 8.3e-07,
        DPMSolverMultistep (Karras σ) as dpmpp_2m 1.7e-06, DPMSolverMultistep(sde-dpmsolver++) as dpmpp_2m_sde
        4.2e-07, UniPCMultistep (bh2, order 2) 2.4e-06 (order 3: 1.4e-06, order 1: 1.5e-06, checked by hand)
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ldm.diffusion.denoiser import DiscreteDenoiser
from ldm.diffusion.samplers import SAMPLERS, sample
from ldm.diffusion.schedules import get_sigmas, make_betas, sigmas_karras

DET = ["ddim", "plms", "euler", "heun", "lms", "dpmpp_2m", "unipc"]
STOCH = ["ddpm", "euler_a", "dpmpp_2m_sde", "dpmpp_2s_a"]
SD_AC = torch.cumprod(1 - make_betas("linear"), 0)  # (1000,) float64


class ToyEps(nn.Module):
    """A fixed, smooth, t-dependent linear ε-model on VP input: ε̂ = (W x) (1 + 0.3 sin(t/200)) + 0.1 cos(t/300) b."""

    def __init__(self, C: int = 4) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W = nn.Parameter(0.8 * torch.eye(C) + 0.1 * torch.randn(C, C, generator=g))
        self.b = nn.Parameter(torch.randn(C, generator=g))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1)
        wx = torch.einsum("oc,bchw->bohw", self.W, x)
        return wx * (1 + 0.3 * torch.sin(t / 200)) + 0.1 * torch.cos(t / 300) * self.b[None, :, None, None]


class NoiseSeq:
    """Hands out a fixed sequence of noise tensors, one per call, whatever the arguments (same noise for both sides)."""

    def __init__(self, shape: tuple[int, ...], seed: int = 1) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.shape = shape

    def __call__(self, *args: object) -> torch.Tensor:
        return torch.randn(self.shape, generator=self.g)


# -- 1. every sampler reaches the exact Gaussian target --------------------------------------------------------
MU, S = 0.5, 0.8


def gaussian_D(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The exact denoiser for x0 ~ N(μ, s²): E[x0 | x0 + σε = x] = (s² x + σ² μ)/(s² + σ²)."""
    s2 = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype) ** 2
    return (S**2 * x + s2 * MU) / (S**2 + s2)


@pytest.mark.parametrize("name", DET + STOCH)
def test_gaussian_target(name: str) -> None:
    torch.manual_seed(0)
    kind = "ddim" if name in ("ddim", "plms", "ddpm") else "karras"
    first_order = name in ("ddim", "euler", "ddpm", "euler_a")  # −6% std at 30 steps: they need many more
    sig = get_sigmas(SD_AC, 250 if first_order else 50, kind)
    z = torch.randn(1000, 4)  # 4000 samples
    x_T = MU + z * math.sqrt(S**2 + sig[0].item() ** 2)  # exact marginal at σ_max
    gens = [torch.Generator().manual_seed(i) for i in range(1000)]
    out = sample(name, gaussian_D, x_T, sig, generators=gens, disable=True)
    s_end = sig[-1].item()  # DDIM-type schedules end at σ(ᾱ_0) ≈ 0.029, not 0
    assert abs(out.mean().item() - MU) < 0.03, name
    assert abs(out.std().item() / math.sqrt(S**2 + s_end**2) - 1) < 0.03, name
    if name in DET:  # the probability-flow ODE maps x_T to μ + s (x_T − μ)/√(s² + σ_max²) exactly
        exact = MU + math.sqrt(S**2 + s_end**2) * (x_T - MU) / math.sqrt(S**2 + sig[0].item() ** 2)
        tol = 3e-2 if first_order else 5e-3  # measured: 2.1e-2 / 2.3e-2 (ddim/euler), ≤ 3.9e-3 (2nd order)
        assert (out - exact).abs().max().item() < tol, name


def test_batch_independent_noise() -> None:
    """Per-image generators: an image's result does not depend on the batch it is sampled in."""
    sig = get_sigmas(SD_AC, 10, "karras")
    x = torch.randn(3, 4, 2, 2) * sig[0]
    for name in STOCH:
        full = sample(name, gaussian_D, x, sig, generators=[torch.Generator().manual_seed(10 + i) for i in range(3)])
        one = sample(name, gaussian_D, x[1:2], sig, generators=[torch.Generator().manual_seed(11)])
        torch.testing.assert_close(full[1:2], one, rtol=0, atol=1e-6, msg=name)


def test_sampler_identities() -> None:
    """DDIM(η=0) is the Euler step in σ-space; DDIM(η=1), DDPM and Euler ancestral are the same posterior step."""
    sig = get_sigmas(SD_AC, 8, "ddim", dtype=torch.float64)
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64) * sig[0]
    torch.testing.assert_close(sample("ddim", gaussian_D, x, sig), sample("euler", gaussian_D, x, sig))
    outs = [sample(n, gaussian_D, x, sig, noise_sampler=NoiseSeq(x.shape), **kw)
            for n, kw in [("ddim", {"eta": 1.0}), ("ddpm", {}), ("euler_a", {})]]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0].double())


def test_registry_and_errors() -> None:
    assert set(SAMPLERS) == set(DET + STOCH)
    sig = get_sigmas(SD_AC, 4, "karras")
    with pytest.raises(ValueError, match="dpmpp_2m.*euler"):
        sample("nope", gaussian_D, torch.zeros(1, 1), sig)
    with pytest.raises(TypeError, match="bogus"):
        sample("euler", gaussian_D, torch.zeros(1, 1), sig, bogus=1)
    with pytest.raises(ValueError, match="generators"):
        sample("euler_a", gaussian_D, torch.zeros(2, 1), sig, generators=[torch.Generator()])
    with pytest.raises(ValueError, match="non-increasing"):
        sample("euler", gaussian_D, torch.zeros(1, 1), sig.flip(0))
    sample("euler", gaussian_D, torch.zeros(1, 1), sig, eta=0.0)  # generic options are accepted and dropped


def test_no_inplace_mutation() -> None:
    sig = get_sigmas(SD_AC, 6, "karras")
    x = torch.randn(2, 4, 2, 2) * sig[0]
    x_copy, sig_copy = x.clone(), sig.clone()
    extra: dict = {}
    for name in SAMPLERS:
        sample(name, lambda x, s, **kw: gaussian_D(x, s), x, sig, extra_args=extra, disable=True)
    assert torch.equal(x, x_copy) and torch.equal(sig, sig_copy) and extra == {}


# -- 2. equality with k-diffusion on the same denoiser ---------------------------------------------------------
K_PAIRS = [("euler", "sample_euler"), ("euler_a", "sample_euler_ancestral"), ("heun", "sample_heun"),
           ("lms", "sample_lms"), ("dpmpp_2m", "sample_dpmpp_2m"), ("dpmpp_2m_sde", "sample_dpmpp_2m_sde"),
           ("dpmpp_2s_a", "sample_dpmpp_2s_ancestral")]


@pytest.mark.parametrize("ours,theirs", K_PAIRS)
def test_matches_k_diffusion(ours: str, theirs: str) -> None:
    import k_diffusion.sampling as ks  # a dev dependency: missing means a broken install, not a skip
    D = DiscreteDenoiser(ToyEps(), SD_AC)
    sig = sigmas_karras(12, 0.0292, 14.6146).float()
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3)) * sig[0]
    kw_ours, kw_theirs = {}, {}
    if ours in ("euler_a", "dpmpp_2m_sde", "dpmpp_2s_a"):
        kw_ours["noise_sampler"], kw_theirs["noise_sampler"] = NoiseSeq(x.shape), NoiseSeq(x.shape)
    a = sample(ours, D, x, sig, disable=True, **kw_ours)
    b = getattr(ks, theirs)(D, x, sig, disable=True, **kw_theirs)
    err = (a - b).abs().max().item()
    assert err < 5e-6, f"{ours}: {err:.2e}"


# -- 3. equality with diffusers' schedulers on the same toy ε-model --------------------------------------------
SD_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
STEPS = 12


def _run_diffusers(sched, model: nn.Module, x: torch.Tensor, gen: torch.Generator | None,
                   eta: float | None) -> torch.Tensor:
    sched.set_timesteps(STEPS)
    x = x * sched.init_noise_sigma
    kw: dict = {"generator": gen} if gen is not None else {}
    if eta is not None:
        kw["eta"] = eta  # DDIMScheduler takes η per step
    for t in sched.timesteps:
        eps = model(sched.scale_model_input(x, t), t)
        x = sched.step(eps, t, x, **kw).prev_sample
    return x


def _diffusers_case(name: str):
    """(diffusers scheduler, our sampler name, our σ from the scheduler, VP (True) or σ-space sample, options)."""
    import diffusers as df

    lead = dict(SD_CONFIG, timestep_spacing="leading", steps_offset=1)
    vp_ddim = dict(lead, clip_sample=False, set_alpha_to_one=False)
    if name.startswith("ddim"):
        eta = float(name.split("_")[1])
        return df.DDIMScheduler(**vp_ddim), "ddim", None, True, {"eta": eta}
    return {
        "ddpm": (df.DDPMScheduler(**lead, clip_sample=False), "ddpm", None, True, {}),
        "plms": (df.PNDMScheduler(**lead, skip_prk_steps=True, set_alpha_to_one=False), "plms", None, True, {}),
        "euler": (df.EulerDiscreteScheduler(**lead), "euler", "sigmas", False, {}),
        "euler_a": (df.EulerAncestralDiscreteScheduler(**lead), "euler_a", "sigmas", False, {}),
        "heun": (df.HeunDiscreteScheduler(**lead), "heun", "heun", False, {}),
        "lms": (df.LMSDiscreteScheduler(**lead), "lms", "sigmas", False, {}),
        "dpmpp_2m": (df.DPMSolverMultistepScheduler(**SD_CONFIG, use_karras_sigmas=True), "dpmpp_2m", "sigmas",
                     True, {}),
        "dpmpp_2m_sde": (df.DPMSolverMultistepScheduler(**SD_CONFIG, algorithm_type="sde-dpmsolver++"),
                         "dpmpp_2m_sde", "sigmas", True, {}),
        "unipc": (df.UniPCMultistepScheduler(**SD_CONFIG), "unipc", "sigmas", True, {}),
    }[name]


def _our_sigmas(sched, how: str | None, ac: torch.Tensor) -> torch.Tensor:
    if how is None:  # DDIM/DDPM/PNDM: σ at the scheduler's timesteps, then its final ᾱ
        from ldm.diffusion.schedules import DiscreteSchedule, ddim_timesteps

        s = DiscreteSchedule(ac)
        final = 0.0 if type(sched).__name__ == "DDPMScheduler" else s.sigma_min
        return torch.cat([s.sigmas[ddim_timesteps(1000, STEPS)], torch.tensor([final], dtype=torch.float64)])
    sig = sched.sigmas.double()
    return torch.cat([sig[:1], sig[1::2]]) if how == "heun" else sig  # Heun repeats each interior σ


DIFFUSERS = ["ddim_0", "ddim_0.7", "ddpm", "plms", "euler", "euler_a", "heun", "lms", "dpmpp_2m", "dpmpp_2m_sde",
             "unipc"]


@pytest.mark.parametrize("name", DIFFUSERS)
def test_matches_diffusers(name: str) -> None:
    import diffusers  # noqa: F401 (a dev dependency)
    sched, ours, how, vp, opts = _diffusers_case(name)
    model = ToyEps()
    ac = sched.alphas_cumprod.double()  # diffusers' own float32 table, so only the algorithms are compared
    D = DiscreteDenoiser(model, ac, quantize=True)  # diffusers feeds integer timesteps
    noise = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(5))
    stochastic = ours in STOCH or opts.get("eta", 0) > 0
    with torch.no_grad():
        ref = _run_diffusers(sched, model, noise, torch.Generator().manual_seed(9) if stochastic else None,
                             opts.get("eta"))
    sched.set_timesteps(STEPS)
    sig = _our_sigmas(sched, how, ac).float()
    x = noise * sched.init_noise_sigma * (math.sqrt(sig[0].item() ** 2 + 1) if vp else 1.0)
    if stochastic:
        opts["noise_sampler"] = NoiseSeq(tuple(noise.shape), seed=9)
    out = sample(ours, D, x, sig, disable=True, **opts)
    if vp:
        out = out / math.sqrt(sig[-1].item() ** 2 + 1)
    err = (out - ref).abs().max().item()
    assert err < 1e-5, f"{name}: {err:.2e}"
