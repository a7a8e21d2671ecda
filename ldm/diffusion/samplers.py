"""Samplers: stateless functions over a σ array, ``sample_X(model, x, sigmas, extra_args, callback, disable, ...)``.

``model(x, sigma, **extra_args) -> x̂0`` (a :class:`~ldm.diffusion.denoiser.DiscreteDenoiser`, possibly guided);
x starts as x0 + σ_max·noise in σ-space. Stochastic samplers draw noise from ``noise_sampler(σ, σ_next)``, or from
per-image ``generators`` (batch-size independent), or ``torch.randn_like``. The single-step samplers live here, the
multistep ones in :mod:`ldm.diffusion.samplers_multistep`; :data:`SAMPLERS` and :func:`sample` cover both.
"""
from __future__ import annotations

import inspect
import logging
import math
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ldm.diffusion.samplers_common import (NoiseSampler, SigmaSteps, ancestral_step, call, check_eta,
                                           make_noise_sampler, report, steps, to_d)
from ldm.diffusion.samplers_multistep import (sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_2s_ancestral,
                                              sample_plms, sample_unipc)

log = logging.getLogger(__name__)
Gens = Sequence[torch.Generator] | None


@torch.no_grad()
def sample_ddpm(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                callback: Callable | None = None, disable: bool | None = None, generators: Gens = None,
                noise_sampler: NoiseSampler | None = None, s_noise: float = 1.0) -> torch.Tensor:
    """Algorithm 2 of Ho et al. 2020 (DDPM ancestral sampling), over any σ sequence.

    The posterior q(x_s | x_t, x̂0) (eqs. 6–7, "fixed small" variance β̃) written in σ-space:
    μ̃ = x̂0 + (σ_s²/σ_t²)(x_t − x̂0),  β̃ = σ_s²(σ_t² − σ_s²)/σ_t².  No noise is added when σ_s = 0.
    """
    sig, noise = SigmaSteps(sigmas, x), make_noise_sampler(x, generators, noise_sampler)
    for i in steps(len(sig) - 1, disable):
        s, s_next = sig[i], sig[i + 1]
        denoised = call(model, x, sig, s, extra_args)
        report(callback, x, i, s, denoised)
        if s_next == 0:
            x = denoised
            continue
        mean = denoised + (s_next**2 / s**2) * (x - denoised)  # eq. 7, μ̃_t
        std = math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2)  # eq. 7, √β̃_t
        x = mean + noise(s, s_next) * (s_noise * std)
    return x


@torch.no_grad()
def sample_ddim(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                callback: Callable | None = None, disable: bool | None = None, eta: float = 0.0,
                generators: Gens = None, noise_sampler: NoiseSampler | None = None,
                s_noise: float = 1.0) -> torch.Tensor:
    """Song et al. 2021 (DDIM), eq. 12 in σ-space: x_s = x̂0 + √(σ_s² − σ_η²)·ε̂ + σ_η·z, ε̂ = (x_t − x̂0)/σ_t.

    σ_η is eq. 16's σ_t(η) (η = 0: deterministic, the Euler step of the probability-flow ODE in σ-space;
    η = 1: DDPM). Use ``get_sigmas(..., "ddim")`` for the original timesteps.
    """
    check_eta(eta)
    sig, noise = SigmaSteps(sigmas, x), make_noise_sampler(x, generators, noise_sampler)
    for i in steps(len(sig) - 1, disable):
        s, s_next = sig[i], sig[i + 1]
        denoised = call(model, x, sig, s, extra_args)
        report(callback, x, i, s, denoised)
        s_down, s_up = ancestral_step(s, s_next, eta)
        x = denoised + to_d(x, s, denoised) * s_down  # x̂0 + "direction pointing to x_t"
        if s_up > 0:
            x = x + noise(s, s_next) * (s_noise * s_up)
    return x


def _churn(x: torch.Tensor, s: float, gamma: float, noise: NoiseSampler, s_noise: float) -> tuple[torch.Tensor, float]:
    """Karras et al. 2022, Algorithm 2 lines 5–6: raise σ to σ̂ = σ(1 + γ) by adding fresh noise."""
    s_hat = s * (gamma + 1)
    if gamma > 0:
        x = x + noise(s, s_hat) * (s_noise * math.sqrt(s_hat**2 - s**2))
    return x, s_hat


def _gamma(n: int, s: float, s_churn: float, s_tmin: float, s_tmax: float) -> float:
    return min(s_churn / n, 2**0.5 - 1) if s_tmin <= s <= s_tmax else 0.0


@torch.no_grad()
def sample_euler(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                 callback: Callable | None = None, disable: bool | None = None, s_churn: float = 0.0,
                 s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generators: Gens = None,
                 noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """Algorithm 2 of Karras et al. 2022 with Euler steps (no Heun correction); deterministic when s_churn = 0."""
    sig, noise = SigmaSteps(sigmas, x), make_noise_sampler(x, generators, noise_sampler)
    n = len(sig) - 1
    for i in steps(n, disable):
        x, s_hat = _churn(x, sig[i], _gamma(n, sig[i], s_churn, s_tmin, s_tmax), noise, s_noise)
        denoised = call(model, x, sig, s_hat, extra_args)
        report(callback, x, i, sig[i], denoised, s_hat)
        x = x + to_d(x, s_hat, denoised) * (sig[i + 1] - s_hat)
    return x


@torch.no_grad()
def sample_euler_ancestral(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                           callback: Callable | None = None, disable: bool | None = None, eta: float = 1.0,
                           s_noise: float = 1.0, generators: Gens = None,
                           noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """Ancestral sampling with Euler steps (k-diffusion): an Euler step to σ_down, then noise of std σ_up
    (see :func:`~ldm.diffusion.samplers_common.ancestral_step`; η = 1 is the DDPM posterior)."""
    check_eta(eta)
    sig, noise = SigmaSteps(sigmas, x), make_noise_sampler(x, generators, noise_sampler)
    for i in steps(len(sig) - 1, disable):
        s, s_next = sig[i], sig[i + 1]
        denoised = call(model, x, sig, s, extra_args)
        report(callback, x, i, s, denoised)
        s_down, s_up = ancestral_step(s, s_next, eta)
        x = x + to_d(x, s, denoised) * (s_down - s)
        if s_next > 0:
            x = x + noise(s, s_next) * (s_noise * s_up)
    return x


@torch.no_grad()
def sample_heun(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                callback: Callable | None = None, disable: bool | None = None, s_churn: float = 0.0,
                s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generators: Gens = None,
                noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """Algorithm 2 of Karras et al. 2022 (Heun's 2nd-order method; an Euler step into σ = 0)."""
    sig, noise = SigmaSteps(sigmas, x), make_noise_sampler(x, generators, noise_sampler)
    n = len(sig) - 1
    for i in steps(n, disable):
        x, s_hat = _churn(x, sig[i], _gamma(n, sig[i], s_churn, s_tmin, s_tmax), noise, s_noise)
        s_next = sig[i + 1]
        denoised = call(model, x, sig, s_hat, extra_args)
        report(callback, x, i, sig[i], denoised, s_hat)
        d, dt = to_d(x, s_hat, denoised), s_next - s_hat
        if s_next == 0:
            x = x + d * dt  # line 8: Euler step
            continue
        x_2 = x + d * dt
        d_2 = to_d(x_2, s_next, call(model, x_2, sig, s_next, extra_args))
        x = x + (d + d_2) * (dt / 2)  # line 11: trapezoidal rule
    return x


def lms_coefficient(order: int, s: Sequence[float], i: int, j: int) -> float:
    """∫_{σ_i}^{σ_{i+1}} ℓ_j(τ) dτ for the Lagrange basis ℓ_j over nodes σ_i, σ_{i−1}, …, σ_{i−order+1} (exact)."""
    if order - 1 > i:
        raise ValueError(f"order {order} too high for step {i}")
    p = np.poly1d([1.0])
    for k in range(order):
        if k != j:
            p = p * np.poly1d([1.0, -s[i - k]]) / (s[i - j] - s[i - k])
    P = p.integ()
    return float(P(s[i + 1]) - P(s[i]))


@torch.no_grad()
def sample_lms(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
               callback: Callable | None = None, disable: bool | None = None, order: int = 4) -> torch.Tensor:
    """Linear multistep (Adams–Bashforth over unequal σ steps) on the ODE derivative, as k-diffusion's
    ``sample_lms``; coefficients are exact integrals of the Lagrange polynomial through the last ``order`` d's."""
    sig = SigmaSteps(sigmas, x)
    ds: list[torch.Tensor] = []
    for i in steps(len(sig) - 1, disable):
        denoised = call(model, x, sig, sig[i], extra_args)
        ds = (ds + [to_d(x, sig[i], denoised)])[-order:]
        report(callback, x, i, sig[i], denoised)
        cur = min(i + 1, order)
        coeffs = [lms_coefficient(cur, sig.values, i, j) for j in range(cur)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "plms": sample_plms,
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "heun": sample_heun,
    "lms": sample_lms,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_2s_a": sample_dpmpp_2s_ancestral,
    "unipc": sample_unipc,
}
# Options every sampler may be handed by a generic caller; a sampler that has no use for one ignores it.
_GENERIC = ("eta", "generators", "noise_sampler", "s_noise")


def sample(name: str, model: Callable, x: torch.Tensor, sigmas: torch.Tensor, **kw: Any) -> torch.Tensor:
    """Run the sampler ``SAMPLERS[name]``. Generic options (eta, generators, noise_sampler, s_noise) that this
    sampler does not take are dropped (a warning for a non-zero eta); ``eta=None`` keeps the sampler's default."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(sorted(SAMPLERS))}")
    fn = SAMPLERS[name]
    params = inspect.signature(fn).parameters
    args = {}
    for k, v in kw.items():
        if k in params:
            if not (k == "eta" and v is None):
                args[k] = v
        elif k in _GENERIC:
            if k == "eta" and v:  # ddpm takes no η either, and it is not deterministic
                log.warning("sampler %r takes no eta; eta=%s is ignored", name, v)
        else:
            raise TypeError(f"sampler {name!r} got an unexpected option {k!r}")
    return fn(model, x, sigmas, **args)
