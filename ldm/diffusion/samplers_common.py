"""Pieces shared by the samplers: per-image noise, σ bookkeeping, the Karras ODE derivative, ancestral steps.

Conventions (k-diffusion): ``model(x, sigma, **extra_args) -> x̂0`` with x in σ-space (x = x0 + σ·ε); ``sigmas`` is a
descending 1-D tensor whose last entry is usually 0. Step coefficients are computed in Python float64 from
``sigmas.tolist()``; the tensors only ever see x's dtype. Nothing passed in is modified in place.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import trange

NoiseSampler = Callable[[float, float], torch.Tensor]


def make_noise_sampler(x: torch.Tensor, generators: Sequence[torch.Generator] | None = None,
                       noise_sampler: NoiseSampler | None = None) -> NoiseSampler:
    """``noise(σ, σ_next) -> (B, ...)`` standard normal noise shaped like x.

    ``noise_sampler`` wins; else image i draws from ``generators[i]`` on that generator's device (so an image's noise
    does not depend on the batch it is in); else ``torch.randn_like``.
    """
    if noise_sampler is not None:
        return noise_sampler
    if generators is None:
        return lambda sigma, sigma_next: torch.randn_like(x)
    gens = list(generators)
    if len(gens) != x.shape[0]:
        raise ValueError(f"generators: need one per image ({x.shape[0]}), got {len(gens)}")
    shape = tuple(x.shape[1:])

    def noise(sigma: float, sigma_next: float) -> torch.Tensor:
        z = [torch.randn(shape, generator=g, device=g.device, dtype=torch.float32) for g in gens]
        return torch.stack(z).to(x.device, x.dtype)  # (B, ...)

    return noise


class SigmaSteps:
    """σ values as Python floats plus a factory for the (B,) σ tensor the model receives.

    A σ equal to the one before it is dropped. A step of zero length is the identity (the ODE moves by
    dσ = 0 and the ancestral/posterior noise σ_next²(σ² − σ_next²)/σ² is 0), but the multistep samplers divide by it:
    DPM-Solver++ and UniPC by h = λ_next − λ, LMS by differences of its Lagrange nodes (inf/NaN otherwise), and a
    σ = 0 before the end would divide by σ in every sampler. Repeats are legal input: the "ddim"/"leading" spacing at
    steps = T has σ(T−1) twice (diffusers' leading timesteps too).
    """

    def __init__(self, sigmas: torch.Tensor, x: torch.Tensor) -> None:
        if sigmas.ndim != 1 or sigmas.numel() < 2:
            raise ValueError(f"sigmas must be a 1-D tensor with at least 2 entries, got shape {tuple(sigmas.shape)}")
        values = sigmas.detach().to("cpu", torch.float64).tolist()
        bad = [v for v in values if not (math.isfinite(v) and v >= 0)]
        if bad:  # NaN would pass the ordering check below and come out as a NaN image
            raise ValueError(f"sigmas must be finite and >= 0, got {bad[:4]}")
        if any(b > a for a, b in zip(values, values[1:])):
            raise ValueError("sigmas must be non-increasing (σ_max … 0)")
        self.values: list[float] = [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]
        ok64 = sigmas.dtype == torch.float64 and x.device.type != "mps"
        self.dtype = torch.float64 if ok64 else torch.float32
        self.batch, self.device = x.shape[0], x.device

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, i: int) -> float:
        return self.values[i]

    def tensor(self, value: float) -> torch.Tensor:
        """(B,) σ for the model call."""
        return torch.full((self.batch,), value, dtype=self.dtype, device=self.device)


def call(model: Callable, x: torch.Tensor, sig: SigmaSteps, sigma: float, extra_args: dict | None) -> torch.Tensor:
    """x̂0 = model(x, σ, **extra_args)."""
    return model(x, sig.tensor(sigma), **(extra_args or {}))


def to_d(x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE derivative dx/dσ = (x − D(x, σ)) / σ (Karras et al. 2022, eq. 3 with σ(t) = t)."""
    return (x - denoised) / sigma


def check_eta(eta: float) -> float:
    """η scales a standard deviation (σ_up, or DPM-Solver++ SDE's noise): it must be finite and >= 0. A negative η
    would shrink σ_down below σ_next without adding the noise that makes up the difference (or take the root of a
    negative number), and NaN would reach the image."""
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    return eta


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(σ_down, σ_up): a step σ → σ_next split into a deterministic move to σ_down and fresh noise of std σ_up,
    σ_down² + σ_up² = σ_next². With η = 1, σ_up² is the DDPM posterior variance σ_next²(σ²−σ_next²)/σ²
    (Ho et al. 2020, eq. 7 in σ-space); η scales it as DDIM's σ_t(η) (Song et al. 2021, eq. 16)."""
    if not eta or sigma_next == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


def steps(n: int, disable: bool | None) -> Any:
    """The progress-bar range over n steps."""
    return trange(n, disable=disable)


def report(callback: Callable | None, x: torch.Tensor, i: int, sigma: float, denoised: torch.Tensor,
           sigma_hat: float | None = None) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma if sigma_hat is None else sigma_hat,
                  "denoised": denoised})
