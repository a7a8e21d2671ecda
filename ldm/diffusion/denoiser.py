"""One denoiser interface: ``D(x, σ, **cond) -> x̂0`` over a network trained on the discrete VP schedule.

With x = x0 + σ·ε in σ-space, the network sees the VP input x·c_in (c_in = 1/√(σ²+1)) and the timestep t(σ), and
D = c_skip·x + c_out·F (Karras et al. 2022, eq. 7, with σ_data = 1):

=========  ==========  ===============  =================================================
output F   c_skip      c_out            because
=========  ==========  ===============  =================================================
"eps"      1           −σ               x0 = x − σ ε
"v"        1/(σ²+1)    −σ/√(σ²+1)       v = α ε − σ_vp x0 (Salimans & Ho 2022), α = 1/√(σ²+1)
"x0"       0           1                F is x̂0
=========  ==========  ===============  =================================================

No sampler ever sees which one the network uses.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ldm.diffusion.schedules import DiscreteSchedule, as_schedule

PARAMETERIZATIONS = ("eps", "v", "x0")


def check_parameterization(parameterization: str) -> str:
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
    return parameterization


def get_scalings(sigma: torch.Tensor, parameterization: str = "eps") -> tuple[torch.Tensor, ...]:
    """(c_skip, c_out, c_in) for σ (any shape, same shape out) — the table in this module's docstring."""
    check_parameterization(parameterization)
    c_in = 1 / (sigma**2 + 1).sqrt()
    if parameterization == "eps":
        return torch.ones_like(sigma), -sigma, c_in
    if parameterization == "v":
        return 1 / (sigma**2 + 1), -sigma * c_in, c_in
    return torch.zeros_like(sigma), torch.ones_like(sigma), c_in


# -- conversions between targets, VP form: x_t = α x0 + s ε with α = √ᾱ, s = √(1−ᾱ) ----------------------------
def target_from_x0_eps(parameterization: str, x0: torch.Tensor, eps: torch.Tensor,
                       alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """What a network of this parameterization should output: ε, v = α ε − s x0, or x0. ``alphas_cumprod``: ᾱ_t
    broadcastable to x0 (e.g. (B, 1, 1, 1))."""
    check_parameterization(parameterization)
    if parameterization == "eps":
        return eps
    if parameterization == "x0":
        return x0
    return alphas_cumprod.sqrt() * eps - (1 - alphas_cumprod).sqrt() * x0


def x0_from_output(parameterization: str, out: torch.Tensor, x_t: torch.Tensor,
                   alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x̂0 from a network output at the VP sample x_t (the inverse of :func:`target_from_x0_eps`)."""
    check_parameterization(parameterization)
    a, s = alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()
    if parameterization == "eps":
        return (x_t - s * out) / a
    if parameterization == "x0":
        return out
    return a * x_t - s * out  # x0 = α x_t − s v


def eps_from_output(parameterization: str, out: torch.Tensor, x_t: torch.Tensor,
                    alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """ε̂ from a network output at the VP sample x_t."""
    check_parameterization(parameterization)
    a, s = alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()
    if parameterization == "eps":
        return out
    if parameterization == "x0":
        return (x_t - a * out) / s
    return s * x_t + a * out  # ε = s x_t + α v


def _net_dtype(model: Any, fallback: torch.dtype) -> torch.dtype:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.dtype
    return fallback


class DiscreteDenoiser(nn.Module):
    """``D(x, σ, **cond) -> x̂0`` for a network ``model(x_vp, t, **cond)`` trained on a discrete schedule.

    Args:
        model: the network (e.g. ``LatentDiffusion.model``), output shaped like its x input.
        alphas_cumprod: (T,) ᾱ of the training schedule (or a :class:`DiscreteSchedule`).
        parameterization: what the network outputs: "eps", "v" or "x0".
        quantize: round t(σ) to the nearest discrete step (k-diffusion ``DiscreteEpsDDPMDenoiser(quantize=True)``);
            by default t is fractional (log-σ interpolation).

    σ arithmetic runs in float64 (float32 on MPS); the network input and floating conditioning are cast to the
    network's dtype and its output back to x's dtype.
    """

    def __init__(self, model: nn.Module | Callable, alphas_cumprod: "torch.Tensor | DiscreteSchedule",
                 parameterization: str = "eps", quantize: bool = False) -> None:
        super().__init__()
        self.inner_model = model
        self.schedule = as_schedule(alphas_cumprod)
        self.parameterization = check_parameterization(parameterization)
        self.quantize = quantize

    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.schedule.sigma_to_t(sigma, quantize=self.quantize)

    def get_scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(c_skip, c_out, c_in) for this network's parameterization."""
        return get_scalings(sigma, self.parameterization)

    @property
    def supports_repeat(self) -> bool:
        """Whether ``forward(..., repeat=G)`` shares x among G contexts (the network's ``supports_repeat``)."""
        return bool(getattr(self.inner_model, "supports_repeat", False))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, repeat: int = 1, **cond: Any) -> torch.Tensor:
        """x: (B, C, ...) in σ-space; sigma: (B,) or scalar; cond: the network's keyword inputs. Returns x̂0 like x.
        ``repeat=G`` (a network that :attr:`supports_repeat`): ``cond["context"]`` holds G·B items, G contexts for
        each x, and the result is (G·B, C, ...), as if x and σ were repeated G times."""
        B = x.shape[0]
        hi = torch.float32 if x.device.type == "mps" else torch.float64
        s = torch.as_tensor(sigma, device=x.device).to(hi).reshape(-1).expand(B)  # (B,)
        c_skip, c_out, c_in = (c.reshape(B, *([1] * (x.ndim - 1))) for c in self.get_scalings(s))
        dt = _net_dtype(self.inner_model, x.dtype)
        t = self.sigma_to_t(s).to(torch.float32)  # (B,) fractional timesteps
        cond = {k: v.to(dt) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in cond.items()}
        if repeat != 1:
            cond["repeat"] = repeat
        F = self.inner_model((x * c_in).to(dt), t, **cond)  # (G·B, C, ...) network output, G = repeat
        x0 = c_skip * x + c_out * F.to(hi).unflatten(0, (repeat, B))  # (G, B, C, ...) x̂0
        return x0.flatten(0, 1).to(x.dtype)  # (G·B, C, ...)
