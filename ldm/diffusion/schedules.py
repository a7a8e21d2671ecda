"""The discrete 1000-step noise schedule of DDPM/LDM and the σ schedules samplers walk along.

Two views of one forward process (Ho et al. 2020; Karras et al. 2022, "EDM"):

* variance preserving (VP, what the U-Net is trained on):  x_t = √ᾱ_t · x0 + √(1−ᾱ_t) · ε
* variance exploding (σ-space, what samplers use):        x_σ = x0 + σ · ε,   σ_t = √((1−ᾱ_t)/ᾱ_t)

so x_σ = x_t / √ᾱ_t = x_t · √(σ²+1).

Zero terminal SNR (Lin et al. 2023): ᾱ_T = 0 gives σ_T = ∞. ``alphas_cumprod`` keeps the exact 0 (the training
loss uses it: x_T = ε, v-target = −x0), while every σ table clamps ᾱ at 2⁻²⁴ (diffusers' choice for its Euler
scheduler), so σ_max ≈ 4096 stays finite and σ ↔ t interpolation, Karras schedules and samplers keep working.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch

log = logging.getLogger(__name__)

ALPHA_BAR_MIN = 2.0**-24  # ᾱ floor for σ tables (σ_max ≈ 4096 under zero terminal SNR)
BETA_KINDS = ("linear", "scaled_linear", "linear_plain", "sqrt_linear", "sqrt", "cosine")
SIGMA_KINDS = ("discrete", "karras", "exponential", "ddim", "leading", "trailing")


def make_betas(kind: str, n: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012,
               cosine_s: float = 8e-3) -> torch.Tensor:
    """β_1..β_n, (n,) float64, with the original LDM ``make_beta_schedule`` names.

    "linear" (alias "scaled_linear", diffusers' name): β = linspace(√start, √end, n)²  (SD v1/v2).
    "linear_plain" (alias "sqrt_linear", LDM's confusing name): β = linspace(start, end, n)  (Ho et al. 2020).
    "sqrt": β = √linspace(start, end, n).
    "cosine": ᾱ(t) = cos²((t/n + s)/(1 + s) · π/2) (Nichol & Dhariwal 2021, eq. 17), β clipped to [0, 0.999].
    """
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"make_betas: n must be an integer >= 2, got {n!r}")
    if kind in ("linear", "scaled_linear"):
        return torch.linspace(linear_start**0.5, linear_end**0.5, n, dtype=torch.float64) ** 2
    if kind in ("linear_plain", "sqrt_linear"):
        return torch.linspace(linear_start, linear_end, n, dtype=torch.float64)
    if kind == "sqrt":
        return torch.linspace(linear_start, linear_end, n, dtype=torch.float64) ** 0.5
    if kind == "cosine":
        t = torch.arange(n + 1, dtype=torch.float64) / n + cosine_s
        f = torch.cos(t / (1 + cosine_s) * math.pi / 2) ** 2  # ᾱ(t) up to normalization
        f = f / f[0]
        return (1 - f[1:] / f[:-1]).clamp(0.0, 0.999)
    raise ValueError(f"make_betas: unknown kind {kind!r}; choose one of {', '.join(BETA_KINDS)}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 of Lin et al. 2023: shift and scale √ᾱ so that √ᾱ_T = 0 and √ᾱ_1 is unchanged. (n,) float64."""
    b = torch.as_tensor(betas, dtype=torch.float64)
    sqrt_ab = torch.cumprod(1 - b, 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1 - alphas


class DiscreteSchedule:
    """ᾱ_t and σ_t of a discrete schedule, and the σ ↔ t maps (log-σ interpolation, as k-diffusion).

    Tables are float64 on the CPU; conversions run on the argument's device (float32 on backends without float64).
    """

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        ac = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)
        if ac.ndim != 1 or ac.numel() < 2:
            raise ValueError(f"alphas_cumprod must be a 1-D tensor of length >= 2, got shape {tuple(ac.shape)}")
        if not bool(((ac >= 0) & (ac <= 1)).all()):
            raise ValueError("alphas_cumprod must lie in [0, 1]")
        self.alphas_cumprod = ac  # (T,) exact, may end in 0
        self.sigmas = ((1 - ac) / ac.clamp(min=ALPHA_BAR_MIN)).sqrt()  # (T,) increasing, finite
        self.log_sigmas = self.sigmas.log()
        self._cache: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> "DiscreteSchedule":
        return cls(torch.cumprod(1 - torch.as_tensor(betas, dtype=torch.float64), 0))

    def __len__(self) -> int:
        return self.sigmas.numel()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def _log_sigmas(self, device: torch.device) -> torch.Tensor:
        dtype = torch.float32 if device.type == "mps" else torch.float64
        key = (str(device), dtype)
        if key not in self._cache:
            self._cache[key] = self.log_sigmas.to(device, dtype)
        return self._cache[key]

    def sigma_to_t(self, sigma: torch.Tensor, quantize: bool = False) -> torch.Tensor:
        """Continuous timestep for σ (any shape): linear interpolation of t in log σ, clamped to [0, T−1].

        ``quantize`` rounds to the nearest discrete step (= nearest in log σ, k-diffusion's ``quantize=True``).
        """
        sigma = torch.as_tensor(sigma)
        ls = self._log_sigmas(sigma.device)
        log_s = sigma.to(ls.dtype).clamp(min=torch.finfo(ls.dtype).tiny).log()
        lo = (torch.searchsorted(ls, log_s.reshape(-1), right=True) - 1).clamp(0, ls.numel() - 2)
        w = ((log_s.reshape(-1) - ls[lo]) / (ls[lo + 1] - ls[lo])).clamp(0, 1)
        t = (lo + w).reshape(sigma.shape)
        return t.round() if quantize else t

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """σ at a (fractional) timestep, log-σ interpolation between the two neighbouring steps."""
        t = torch.as_tensor(t)
        ls = self._log_sigmas(t.device)
        t = t.to(ls.dtype).clamp(0, ls.numel() - 1)
        lo = t.floor().long().clamp(max=ls.numel() - 2)
        w = t - lo
        return ((1 - w) * ls[lo] + w * ls[lo + 1]).exp()


def as_schedule(schedule: "DiscreteSchedule | torch.Tensor") -> DiscreteSchedule:
    """A :class:`DiscreteSchedule` from itself or from an ``alphas_cumprod`` tensor."""
    return schedule if isinstance(schedule, DiscreteSchedule) else DiscreteSchedule(schedule)


def ldm_schedule_buffers(betas: torch.Tensor, v_posterior: float = 0.0) -> dict[str, torch.Tensor]:
    """The 12 schedule buffers of the original LDM ``DDPM.register_schedule``, float32, computed as it does.

    Math in float64 numpy, one cast to float32 at the end (``partial(torch.tensor, dtype=torch.float32)``).
    """
    b = torch.as_tensor(betas, dtype=torch.float64).cpu().numpy()
    alphas = 1.0 - b
    ac = np.cumprod(alphas, axis=0)
    ac_prev = np.append(1.0, ac[:-1])
    with np.errstate(divide="ignore"):  # zero terminal SNR: log(0), 1/0 are inf as in the original
        post_var = (1 - v_posterior) * b * (1.0 - ac_prev) / (1.0 - ac) + v_posterior * b  # Ho et al. eq. 7, β̃_t
        out = {
            "betas": b,
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": np.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
            "posterior_mean_coef1": b * np.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
        }
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in out.items()}


# -- σ schedules for sampling (descending, ending in 0 unless stated) ---------------------------------------------
def _append_zero(s: torch.Tensor) -> torch.Tensor:
    return torch.cat([s, s.new_zeros(1)])


def sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: σ_i = (σ_max^{1/ρ} + i/(n−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, plus a final 0. (n+1,)"""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def sigmas_exponential(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """σ evenly spaced in log σ from σ_max to σ_min, plus a final 0. (n+1,)"""
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp())


def sigmas_discrete(schedule: "DiscreteSchedule | torch.Tensor", n: int) -> torch.Tensor:
    """The model's own σ at t = linspace(T−1, 0, n) (log-σ interpolated), plus a final 0 (k-diffusion's
    ``DiscreteSchedule.get_sigmas``). (n+1,)"""
    s = as_schedule(schedule)
    return _append_zero(s.t_to_sigma(torch.linspace(len(s) - 1, 0, n, dtype=torch.float64)))


def ddim_timesteps(num_train: int, steps: int, offset: int = 1) -> torch.Tensor:
    """DDIM "leading" timesteps, descending: (arange(S) · (T // S) + offset) reversed — diffusers' DDIM/PNDM with
    ``timestep_spacing="leading", steps_offset=1`` (SD's scheduler config). The original LDM uses
    ``range(0, T, T // S) + 1``, identical whenever T % S == 0 (otherwise it takes more steps than asked, and
    fails past S = T/2).

    Between T/2 and T − 1 steps the stride T // S is 1, so the timesteps stop at t = S: sampling from pure noise would
    start at σ(S), far below σ(T − 1) (σ(600) = 2.3 against 14.6 for SD), and img2img's strength would re-noise less
    than it says. diffusers does that silently; here it is refused, naming what works."""
    if not 0 < steps <= num_train:
        raise ValueError(f"steps must be in [1, {num_train}], got {steps}")
    if num_train // steps == 1 and steps - 1 + offset < num_train - 1:
        raise ValueError(f"{steps} steps on DDIM's leading timesteps (samplers ddim, plms, ddpm; sigmas 'ddim' or "
                         f"'leading'): the stride {num_train} // {steps} = 1 stops the timesteps at t = "
                         f"{steps - 1 + offset} of {num_train - 1}, below the noise sampling starts from; use at most "
                         f"{num_train // 2} steps, {num_train - offset} or more, or sigmas 'trailing'")
    return (torch.arange(steps) * (num_train // steps) + offset).clamp(max=num_train - 1).flip(0)


def sigmas_ddim(schedule: "DiscreteSchedule | torch.Tensor", steps: int, offset: int = 1,
                set_alpha_to_one: bool = False) -> torch.Tensor:
    """σ at the DDIM timesteps, descending, then the final level. (steps+1,)

    The final level is σ(ᾱ_0) ≈ 0.0292 for SD, as in the original DDIM/PLMS samplers and diffusers with
    ``set_alpha_to_one=False`` (their last step goes to ``alphas_cumprod[0]``, not to ᾱ = 1); with
    ``set_alpha_to_one=True`` it is 0 (a fully denoised result, as diffusers' DDPMScheduler).
    """
    s = as_schedule(schedule)
    sig = s.sigmas[ddim_timesteps(len(s), steps, offset)]
    last = torch.zeros(1, dtype=torch.float64) if set_alpha_to_one else s.sigmas[:1]
    return torch.cat([sig, last])


def spaced_timesteps(num_train: int, steps: int, spacing: str) -> torch.Tensor:
    """Descending integer timesteps of diffusers' ``timestep_spacing``: "leading" (with SD's ``steps_offset=1``: the
    DDIM timesteps) or "trailing" (``round(T − i·T/S) − 1``, which starts at t = T − 1; Lin et al. 2023, table 2)."""
    if not 0 < steps <= num_train:
        raise ValueError(f"steps must be in [1, {num_train}], got {steps}")
    if spacing == "leading":
        return ddim_timesteps(num_train, steps, offset=1)
    if spacing == "trailing":  # diffusers' own arithmetic (np.arange with a float step), so that ties round alike;
        t = np.round(np.arange(num_train, 0, -num_train / steps))[:steps]  # [:S]: arange can overshoot by one
        return torch.from_numpy(t.astype(np.int64)) - 1
    raise ValueError(f"unknown timestep spacing {spacing!r}; choose leading or trailing")


def sigmas_spaced(schedule: "DiscreteSchedule | torch.Tensor", steps: int, spacing: str) -> torch.Tensor:
    """The model's σ at diffusers' "leading" or "trailing" timesteps, plus a final 0: what diffusers' Euler, Heun,
    LMS and DPM-Solver schedulers walk with those spacings (``interpolation_type="linear"``, integer t). (steps+1,)"""
    s = as_schedule(schedule)
    return _append_zero(s.sigmas[spaced_timesteps(len(s), steps, spacing)])


def get_sigmas(schedule: "DiscreteSchedule | torch.Tensor", steps: int, kind: str = "discrete", rho: float = 7.0,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A descending σ schedule of ``steps`` sampling steps ((steps+1,) on the CPU) for a model's discrete schedule.

    kind: "discrete" (the model's σ at evenly spaced t), "karras" (ρ = ``rho``), "exponential" (log-uniform) or
    "ddim" (the original LDM / diffusers "leading" timesteps, ending at σ(ᾱ_0); see :func:`sigmas_ddim`),
    "leading" or "trailing" (diffusers' timestep spacings, ending at 0; see :func:`sigmas_spaced`).
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    s = as_schedule(schedule)
    if kind == "discrete":
        out = sigmas_discrete(s, steps)
    elif kind == "karras":
        out = sigmas_karras(steps, s.sigma_min, s.sigma_max, rho)
    elif kind == "exponential":
        out = sigmas_exponential(steps, s.sigma_min, s.sigma_max)
    elif kind == "ddim":
        out = sigmas_ddim(s, steps)
    elif kind in ("leading", "trailing"):
        out = sigmas_spaced(s, steps, kind)
    else:
        raise ValueError(f"get_sigmas: unknown kind {kind!r}; choose one of {', '.join(SIGMA_KINDS)}")
    return out.to(dtype)
