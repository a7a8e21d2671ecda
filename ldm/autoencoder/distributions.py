"""The KL autoencoder's posterior q(z|x) = N(μ, diag σ²).

Same math as the original LDM ``DiagonalGaussianDistribution`` (``ldm/modules/distributions/distributions.py``):
the encoder's 2·C channels are split into μ ‖ log σ², and log σ² is clamped to [-30, 20] so that exp() stays finite
in fp16/fp32. ``sample`` takes an optional ``torch.Generator`` so that encoding is reproducible.
"""
from __future__ import annotations

import math

import torch

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class DiagonalGaussianDistribution:
    """N(mean, diag(exp(logvar))) over latents of shape (B, C, h, w).

    Args:
        parameters: (B, 2C, h, w) — mean ‖ logvar along channels.
        deterministic: σ = 0 (``sample`` returns the mean, ``kl`` is 0).
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False) -> None:
        if parameters.ndim < 2 or parameters.shape[1] % 2:
            raise ValueError("parameters must be (B, 2C, ...) with mean ‖ logvar along dim 1, "
                             f"got {tuple(parameters.shape)}")
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)  # (B, C, h, w) each
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.deterministic = deterministic

    @property
    def std(self) -> torch.Tensor:
        """σ = exp(½ log σ²), (B, C, h, w); zeros when deterministic."""
        return torch.zeros_like(self.mean) if self.deterministic else torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        """σ², (B, C, h, w); zeros when deterministic."""
        return torch.zeros_like(self.mean) if self.deterministic else torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = μ + σ·ε, ε ~ N(0, I) drawn from ``generator`` (on the generator's device), (B, C, h, w)."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        """The most likely latent, μ: (B, C, h, w)."""
        return self.mean

    def kl(self, other: "DiagonalGaussianDistribution | None" = None) -> torch.Tensor:
        """KL(self ‖ other) summed over (C, h, w), shape (B,); ``other=None`` means N(0, I)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        dims = list(range(1, self.mean.ndim))
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum((self.mean - other.mean).pow(2) / other.var + self.var / other.var
                               - 1.0 - self.logvar + other.logvar, dim=dims)

    def nll(self, x: torch.Tensor, dims: tuple[int, ...] = (1, 2, 3)) -> torch.Tensor:
        """−log N(x; μ, σ²) summed over ``dims``, shape (B,) by default; 0 when deterministic."""
        if self.deterministic:
            return torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        log_two_pi = math.log(2.0 * math.pi)
        return 0.5 * torch.sum(log_two_pi + self.logvar + (x - self.mean).pow(2) / self.var, dim=list(dims))

    def __repr__(self) -> str:
        return f"DiagonalGaussianDistribution(shape={tuple(self.mean.shape)}, deterministic={self.deterministic})"
