"""The denoising training objective as pure functions (Ho et al. 2020, eq. 14, "L_simple"; Salimans & Ho 2022 for v).

    t ~ U{0, …, T−1},  ε ~ N(0, I) (+ offset noise),  x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε,
    L = w(t) · mean‖F(x_t, t, c) − target‖²,  target ∈ {ε, v = √ᾱ ε − √(1−ᾱ) x0, x0}.

The network is called exactly as the original LDM trains it: VP input and integer timesteps.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from ldm.diffusion.denoiser import check_parameterization, target_from_x0_eps
from ldm.diffusion.schedules import DiscreteSchedule


def _alphas_cumprod(schedule: "DiscreteSchedule | torch.Tensor") -> torch.Tensor:
    ac = schedule.alphas_cumprod if isinstance(schedule, DiscreteSchedule) else torch.as_tensor(schedule)
    if ac.ndim != 1:
        raise ValueError(f"schedule: alphas_cumprod must be 1-D, got shape {tuple(ac.shape)}")
    return ac


def sample_timesteps(batch: int, num_timesteps: int, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """t ~ U{0, …, T−1}, (B,) int64, drawn on the generator's device and moved to ``device``."""
    gdev = generator.device if generator is not None else device
    t = torch.randint(0, num_timesteps, (batch,), generator=generator, device=gdev)
    return t.to(device) if device is not None else t


def sample_noise(shape: tuple[int, ...], offset_noise: float = 0.0, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ε ~ N(0, I) of ``shape`` (B, C, ...), plus offset noise (Guttenberg 2023): ``offset_noise`` · N(0, 1) per
    (sample, channel), constant over space, so the model learns to change an image's mean brightness."""
    gdev = generator.device if generator is not None else device
    eps = torch.randn(shape, generator=generator, device=gdev, dtype=dtype)
    if offset_noise:
        eps = eps + offset_noise * torch.randn(shape[:2] + (1,) * (len(shape) - 2), generator=generator,
                                               device=gdev, dtype=dtype)
    return eps.to(device) if device is not None else eps


def min_snr_weight(snr: torch.Tensor, gamma: float, parameterization: str) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023, eq. 8 and §3.4), expressed for each target:

    x0-loss: min(SNR, γ);  ε-loss: min(SNR, γ)/SNR = min(1, γ/SNR);  v-loss: min(SNR, γ)/(SNR + 1).
    SNR = ᾱ/(1−ᾱ) = 1/σ². The ε form is written so that SNR = 0 (zero terminal SNR) gives weight 1, not NaN.
    """
    check_parameterization(parameterization)
    if gamma <= 0:
        raise ValueError(f"min_snr_gamma must be positive, got {gamma}")
    clipped = snr.clamp(max=gamma)
    if parameterization == "x0":
        return clipped
    if parameterization == "eps":
        return (gamma / snr).clamp(max=1.0)
    return clipped / (snr + 1)


def diffusion_loss(model: Callable[..., torch.Tensor], x0: torch.Tensor, cond: Mapping[str, Any],
                   schedule: "DiscreteSchedule | torch.Tensor", parameterization: str,
                   generator: torch.Generator | None = None, min_snr_gamma: float | None = None,
                   offset_noise: float = 0.0, timesteps: torch.Tensor | None = None,
                   noise: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample denoising loss, (B,) float32.

    Args:
        model: the network, ``model(x_t, t, **cond)`` with x_t (B, C, ...) in VP form and t (B,) int64.
        x0: (B, C, ...) clean (latent) data.
        cond: keyword inputs of the network, e.g. {"context": (B, 77, D)}.
        schedule: (T,) alphas_cumprod (float64 preferred) or a :class:`DiscreteSchedule`.
        parameterization: what the network predicts: "eps", "v" or "x0".
        generator: source of t and ε (reproducible and resumable); its device is used for drawing.
        min_snr_gamma: γ of min-SNR weighting; None: unweighted.
        offset_noise: strength of offset noise (0: off).
        timesteps, noise: override the random draws (tests, importance sampling).
    """
    check_parameterization(parameterization)
    ac = _alphas_cumprod(schedule).to(x0.device)
    B, dev = x0.shape[0], x0.device
    t = sample_timesteps(B, ac.numel(), generator, dev) if timesteps is None else timesteps.to(dev).long()
    eps = sample_noise(tuple(x0.shape), offset_noise, generator, dev) if noise is None else noise.to(dev)
    a_t = ac[t].to(torch.float64 if ac.dtype == torch.float64 and dev.type != "mps" else torch.float32)
    a_t = a_t.reshape(B, *([1] * (x0.ndim - 1)))  # (B, 1, ...)
    x0f, eps = x0.float(), eps.float()
    x_t = (a_t.sqrt() * x0f + (1 - a_t).sqrt() * eps).float()  # (B, C, ...) eq. 4 of Ho et al.
    target = target_from_x0_eps(parameterization, x0f, eps, a_t).float()  # (B, C, ...)
    pred = model(x_t.to(x0.dtype), t, **cond).float()  # (B, C, ...)
    loss = (pred - target).pow(2).flatten(1).mean(1)  # (B,)
    if min_snr_gamma is not None:
        snr = (a_t / (1 - a_t)).reshape(B)  # (B,) inf at ᾱ = 1 is clamped by min(·, γ)
        loss = loss * min_snr_weight(snr, float(min_snr_gamma), parameterization).float()
    return loss
