"""Sampling edge cases: every sampler × every σ kind × 1, 2, 3 (and 7) steps on the tiny model.

On the tiny model (8×8 latents, fp32, and bf16 on the CPU): txt2img, img2img at low strength (5 steps × 0.1 → one step
from the schedule's last σ > 0) and at strength 1, and inpainting with a mask. Every output must be finite and
(B, 4, 8, 8); image 1 of a batch of two must equal the same prompt and seed alone; a call repeated after all the
others (other samplers' settings in between) must give the same bits. Measured max |batch − alone| in fp32: 9.5e-4
on outputs of magnitude 45 (2.1e-5 relative: batched matmuls round differently, and Heun's one step from σ_max to
σ_min multiplies the network's rounding by |Δσ|/2σ_min ≈ 250); 1.5e-6 relative for the others; in bf16: 0.

Then σ schedules that a sampler cannot walk as given, on an exact Gaussian denoiser (no network needed): repeated σ
(legal, non-increasing input; the "leading"/"ddim" spacing at steps = T has σ(T−1) twice) and σ = 0 before the end
must give the result of the schedule without the repeat (they gave NaN or ZeroDivisionError in LMS, DPM-Solver++ and
UniPC, a polluted history in PLMS, and NaN in 7 of 11 samplers for σ = 0 before the end); NaN, inf or negative σ and a
negative or non-finite η must be refused with a ValueError naming the argument (NaN came through, or a bare "math
domain error"). DDPM through ``generate`` must not draw fresh noise on its last step.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from ldm.diffusion.samplers import SAMPLERS, sample
from ldm.diffusion.schedules import SIGMA_KINDS, get_sigmas, make_betas
from tiny_model import tiny_with_signal

NAMES = sorted(SAMPLERS)
PROMPTS = ["a red cat", "a blue dog"]
SEED = 3
GUIDANCE = 2.0
INIT = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1  # (B, 3, H, W) in [-1, 1]
MASK = torch.zeros(2, 1, 32, 32)
MASK[..., 16:] = 1  # repaint the right half: latent columns 4..7
BATCH_RTOL = 1e-4  # |batch − alone| / max(1, |z|): measured ≤ 2.1e-5 in fp32 (Heun, 2 steps, strength 1)


@pytest.fixture(scope="module")
def tiny():
    return tiny_with_signal()


@pytest.fixture(scope="module")
def tiny_bf16(tiny):
    return copy.deepcopy(tiny).to(dtype=torch.bfloat16)


def gen(model, n: int = 2, **kw) -> torch.Tensor:
    """Latents of the first n prompts (seed SEED + image index, as in a batch of two); img2img/inpainting inputs are
    cut to the same images."""
    first = 2 - n  # n = 1: the second image alone, seed SEED + 1
    for k in ("init_image", "mask"):
        if k in kw:
            kw[k] = kw[k][first:]
    return model.generate(PROMPTS[first:], seed=SEED + first, guidance=GUIDANCE, output="latent", progress=False,
                          **kw)


def check(z: torch.Tensor, what: object, batch: int = 2) -> torch.Tensor:
    assert z.shape == (batch, 4, 8, 8), (what, tuple(z.shape))
    assert torch.isfinite(z).all(), what
    return z


def check_invariance(model, z: torch.Tensor, what: object, **kw) -> None:
    """Image 1 of the batch equals the same prompt and seed alone; the same call again gives the same bits."""
    alone = check(gen(model, n=1, **kw), what, batch=1)
    err = (z[1:] - alone).abs().max().item()
    assert err <= BATCH_RTOL * max(1.0, z.abs().max().item()), f"{what}: batch of 2 vs alone differ by {err:.2e}"
    assert torch.equal(gen(model, **kw), z), f"{what}: a second call with the same seed differs"


# -- the tiny model: every sampler × every σ kind ---------------------------------------------------------------
@pytest.mark.parametrize("sampler", NAMES)
def test_txt2img_every_sigma_kind_and_step_count(tiny, sampler):
    out = {}
    for kind in SIGMA_KINDS:
        for steps in (1, 2, 3):
            out[kind, steps] = check(gen(tiny, sampler=sampler, sigmas=kind, steps=steps), (kind, steps))
    check(gen(tiny, sampler=sampler, steps=7), "auto, 7 steps")
    kind = SIGMA_KINDS[NAMES.index(sampler) % len(SIGMA_KINDS)]  # each kind is checked with some sampler
    check_invariance(tiny, out[kind, 3], (kind, 3), sampler=sampler, sigmas=kind, steps=3)


@pytest.mark.parametrize("sampler", NAMES)
def test_img2img_and_inpainting(tiny, sampler):
    kind = SIGMA_KINDS[NAMES.index(sampler) % len(SIGMA_KINDS)]
    low = {}
    for k in SIGMA_KINDS:  # 5 steps × 0.1 → one step, from the last σ > 0 of each schedule
        low[k] = check(gen(tiny, sampler=sampler, sigmas=k, steps=5, init_image=INIT, strength=0.1), ("low", k))
    full = check(gen(tiny, sampler=sampler, steps=2, init_image=INIT, strength=1.0), "strength 1")
    z0 = tiny.vae.encode_latents(INIT)  # (2, 4, 8, 8)
    inpainted = {}
    for k in ("karras", "ddim"):  # a schedule ending at 0 and one ending above 0 (then divided back to VP)
        z = check(gen(tiny, sampler=sampler, sigmas=k, steps=2, init_image=INIT, mask=MASK, strength=1.0), k)
        torch.testing.assert_close(z[..., :4], z0[..., :4], rtol=0, atol=1e-6, msg=f"{k}: known region changed")
        assert not torch.allclose(z[..., 4:], z0[..., 4:], atol=1e-2), f"{k}: the masked region was not repainted"
        inpainted[k] = z
    check_invariance(tiny, low[kind], ("low", kind), sampler=sampler, sigmas=kind, steps=5, init_image=INIT,
                     strength=0.1)
    check_invariance(tiny, full, "strength 1", sampler=sampler, steps=2, init_image=INIT, strength=1.0)
    check_invariance(tiny, inpainted["ddim"], "inpainting", sampler=sampler, sigmas="ddim", steps=2, init_image=INIT,
                     mask=MASK, strength=1.0)


@pytest.mark.parametrize("sampler", NAMES)
def test_bf16(tiny_bf16, sampler):
    out = {kind: check(gen(tiny_bf16, sampler=sampler, sigmas=kind, steps=2), kind) for kind in SIGMA_KINDS}
    check(gen(tiny_bf16, sampler=sampler, steps=5, init_image=INIT, strength=0.1), "img2img, 1 step")
    z = check(gen(tiny_bf16, sampler=sampler, steps=2, init_image=INIT, mask=MASK, strength=1.0), "inpainting")
    z0 = tiny_bf16.vae.encode_latents(INIT.to(torch.bfloat16)).float()
    torch.testing.assert_close(z[..., :4], z0[..., :4], rtol=0, atol=1e-6)
    kind = SIGMA_KINDS[NAMES.index(sampler) % len(SIGMA_KINDS)]
    check_invariance(tiny_bf16, out[kind], kind, sampler=sampler, sigmas=kind, steps=2)


def test_ddpm_adds_no_noise_on_its_last_step(tiny):
    """Ho et al. 2020, Algorithm 2: z = 0 at the last step, so with the start noise given (``latents``) a one-step
    DDPM result does not depend on the seed, which then only seeds the per-step noise. The auto schedule used to be
    DDIM's, ending at σ(ᾱ_0) ≈ 0.029 > 0, whose last step adds fresh noise of about that std."""
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    a, b = (tiny.generate(["x"], sampler="ddpm", steps=1, latents=noise, seed=s, output="latent", progress=False)
            for s in (1, 2))
    assert torch.equal(a, b)


def test_generate_refuses_a_negative_eta(tiny):
    with pytest.raises(ValueError, match="eta"):
        gen(tiny, sampler="dpmpp_2m_sde", steps=2, eta=-1.0)


# -- σ schedules a sampler cannot walk as given, on the exact denoiser of a Gaussian ------------------------------
SD_AC = torch.cumprod(1 - make_betas("linear"), 0)  # (1000,) float64
MU, S = 0.5, 0.8


def gaussian_D(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x0 | x0 + σε = x] for x0 ~ N(μ, s²)."""
    s2 = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype) ** 2
    return (S**2 * x + s2 * MU) / (S**2 + s2)


def run(name: str, sig: torch.Tensor, **kw) -> torch.Tensor:
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * sig[0].item()
    gens = [torch.Generator().manual_seed(10 + i) for i in range(2)]
    return sample(name, gaussian_D, x, sig, generators=gens, disable=True, **kw)


def _t(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64)


LEADING_T = get_sigmas(SD_AC, 1000, "leading", dtype=torch.float64)  # σ(999) twice: timesteps 1000 → 999 clamped
REPEATS = {  # schedule with a repeated σ → the same schedule without it
    "leading, steps = T": (torch.cat([LEADING_T[:6], _t(0.0)]), torch.cat([LEADING_T[1:6], _t(0.0)])),
    "ddim, steps = T": (get_sigmas(SD_AC, 1000, "ddim", dtype=torch.float64)[:6],
                        get_sigmas(SD_AC, 1000, "ddim", dtype=torch.float64)[1:6]),
    "middle": (_t(10.0, 3.0, 3.0, 1.0, 0.0), _t(10.0, 3.0, 1.0, 0.0)),
    "zero twice": (_t(10.0, 1.0, 0.0, 0.0), _t(10.0, 1.0, 0.0)),
    "last, above 0": (_t(10.0, 3.0, 1.0, 1.0), _t(10.0, 3.0, 1.0)),
}


@pytest.mark.parametrize("case", REPEATS)
@pytest.mark.parametrize("name", NAMES)
def test_repeated_sigma_is_a_step_of_zero_length(name, case):
    sig, without = REPEATS[case]
    assert sig.numel() == without.numel() + 1 and sig[0] >= sig[1]
    out = run(name, sig)
    assert torch.isfinite(out).all(), (name, case)
    torch.testing.assert_close(out, run(name, without), rtol=0, atol=0, msg=f"{name}, {case}")


@pytest.mark.parametrize("name", NAMES)
def test_one_step_into_zero_is_the_denoiser(name):
    """Multistep and second-order samplers with a single step into σ = 0: x̂0 = D(x, σ_max), nothing else."""
    for sig in (get_sigmas(SD_AC, 1, "karras", dtype=torch.float64), _t(3.0, 0.0)):
        x = torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * sig[0].item()
        out = sample(name, gaussian_D, x, sig, generators=[torch.Generator().manual_seed(i) for i in range(2)],
                     disable=True)
        torch.testing.assert_close(out, gaussian_D(x, sig[:1]), rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("bad", [_t(10.0, math.nan, 0.0), _t(math.inf, 1.0, 0.0), _t(10.0, 1.0, -0.5),
                                 _t(1.0, 10.0, 0.0)], ids=["nan", "inf", "negative", "increasing"])
@pytest.mark.parametrize("name", NAMES)
def test_unusable_sigmas_are_refused_by_name(name, bad):
    with pytest.raises(ValueError, match="sigmas"):
        run(name, bad)


@pytest.mark.parametrize("eta", [-0.5, math.nan, math.inf])
@pytest.mark.parametrize("name", ["ddim", "euler_a", "dpmpp_2s_a", "dpmpp_2m_sde"])
def test_bad_eta_is_refused_by_name(name, eta):
    with pytest.raises(ValueError, match="eta"):
        run(name, get_sigmas(SD_AC, 3, "karras", dtype=torch.float64), eta=eta)
