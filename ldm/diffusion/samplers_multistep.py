"""Multistep and exponential-integrator samplers: PLMS, DPM-Solver++ (2M, 2M SDE, 2S ancestral), UniPC.

Same conventions as :mod:`ldm.diffusion.samplers`. DPM-Solver++ and UniPC work in λ = −log σ (the half-log-SNR of
Lu et al. 2022, since α/σ_vp = 1/σ in σ-space), with the data prediction x̂0 = D(x, σ).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from ldm.diffusion.samplers_common import (NoiseSampler, SigmaSteps, ancestral_step, call, check_eta,
                                           make_noise_sampler, report, steps, to_d)

Gens = Sequence[torch.Generator] | None


@torch.no_grad()
def sample_plms(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                callback: Callable | None = None, disable: bool | None = None) -> torch.Tensor:
    """Pseudo linear multistep (Liu et al. 2022, PNDM, eqs. 11–12 with the "F-PNDM" fourth-order Adams–Bashforth
    combination of ε), as the original LDM ``PLMSSampler``: the first step is a pseudo improved Euler step
    (ε' = (ε_t + ε(x̃_next, t_next)) / 2), then 2nd-, 3rd-, 4th-order combinations of past ε. The transfer
    φ(x_t, ε') is the DDIM step, which in σ-space is x_next = x + (σ_next − σ) ε'. Matches diffusers' PNDMScheduler
    with ``skip_prk_steps=True`` (one extra model call in the warm-up, as the original)."""
    sig = SigmaSteps(sigmas, x)
    old: list[torch.Tensor] = []
    for i in steps(len(sig) - 1, disable):
        s, s_next = sig[i], sig[i + 1]
        denoised = call(model, x, sig, s, extra_args)
        report(callback, x, i, s, denoised)
        e = to_d(x, s, denoised)  # ε̂_t (σ-space derivative)
        if not old and s_next > 0:
            x_pred = x + e * (s_next - s)
            e_prime = (e + to_d(x_pred, s_next, call(model, x_pred, sig, s_next, extra_args))) / 2
        elif not old:
            e_prime = e
        elif len(old) == 1:
            e_prime = (3 * e - old[-1]) / 2
        elif len(old) == 2:
            e_prime = (23 * e - 16 * old[-1] + 5 * old[-2]) / 12
        else:
            e_prime = (55 * e - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24
        old = (old + [e])[-3:]
        x = x + e_prime * (s_next - s)
    return x


def _lam(s: float) -> float:
    return -math.log(s)


@torch.no_grad()
def sample_dpmpp_2m(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                    callback: Callable | None = None, disable: bool | None = None) -> torch.Tensor:
    """DPM-Solver++(2M), Algorithm 2 of Lu et al. 2022b ("DPM-Solver++"), first order on the first step and into
    σ = 0: x_next = (σ_next/σ) x − (e^{−h} − 1) D̃, D̃ = (1 + 1/2r) D_i − (1/2r) D_{i−1}, r = h_{i−1}/h_i."""
    sig = SigmaSteps(sigmas, x)
    old = None
    for i in steps(len(sig) - 1, disable):
        s, s_next = sig[i], sig[i + 1]
        denoised = call(model, x, sig, s, extra_args)
        report(callback, x, i, s, denoised)
        if s_next == 0:
            x = denoised
        else:
            h = _lam(s_next) - _lam(s)
            d = denoised
            if old is not None:
                r = (_lam(s) - _lam(sig[i - 1])) / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            x = (s_next / s) * x - math.expm1(-h) * d
        old = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                        callback: Callable | None = None, disable: bool | None = None, eta: float = 1.0,
                        s_noise: float = 1.0, generators: Gens = None, noise_sampler: NoiseSampler | None = None,
                        solver_type: str = "midpoint") -> torch.Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022b, eq. 18 / k-diffusion): the multistep data-prediction solver of the
    reverse SDE; η scales the injected noise (η = 0 is DPM-Solver++(2M)). solver_type: "midpoint" or "heun"."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    check_eta(eta)
    sig, noise = SigmaSteps(sigmas, x), make_noise_sampler(x, generators, noise_sampler)
    old, h_last = None, None
    for i in steps(len(sig) - 1, disable):
        s, s_next = sig[i], sig[i + 1]
        denoised = call(model, x, sig, s, extra_args)
        report(callback, x, i, s, denoised)
        if s_next == 0:
            x, h = denoised, None
        else:
            h = _lam(s_next) - _lam(s)
            eta_h = eta * h
            phi = -math.expm1(-h - eta_h)  # 1 − e^{−(1+η)h}
            x = (s_next / s) * math.exp(-eta_h) * x + phi * denoised
            if old is not None and h_last is not None:
                r = h_last / h
                k = (phi / (-h - eta_h) + 1) if solver_type == "heun" else 0.5 * phi
                x = x + k * (1 / r) * (denoised - old)
            if eta:
                x = x + noise(s, s_next) * (s_next * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise)
        old, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model: Callable, x: torch.Tensor, sigmas: torch.Tensor,
                              extra_args: dict | None = None, callback: Callable | None = None,
                              disable: bool | None = None, eta: float = 1.0, s_noise: float = 1.0,
                              generators: Gens = None, noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """Ancestral sampling with DPM-Solver++(2S) steps (Lu et al. 2022b, Algorithm 1 with r = 1/2): a single-step
    second-order move to σ_down through the midpoint in λ, then noise of std σ_up."""
    check_eta(eta)
    sig, noise = SigmaSteps(sigmas, x), make_noise_sampler(x, generators, noise_sampler)
    for i in steps(len(sig) - 1, disable):
        s, s_next = sig[i], sig[i + 1]
        denoised = call(model, x, sig, s, extra_args)
        report(callback, x, i, s, denoised)
        s_down, s_up = ancestral_step(s, s_next, eta)
        if s_down == 0:
            x = x + to_d(x, s, denoised) * (s_down - s)
        else:
            h = _lam(s_down) - _lam(s)
            s_mid = math.exp(-(_lam(s) + h / 2))
            x_2 = (s_mid / s) * x - math.expm1(-h / 2) * denoised
            denoised_2 = call(model, x_2, sig, s_mid, extra_args)
            x = (s_down / s) * x - math.expm1(-h) * denoised_2
        if s_next > 0:
            x = x + noise(s, s_next) * (s_noise * s_up)
    return x


# -- UniPC (Zhao et al. 2023) ----------------------------------------------------------------------------------
def _unipc_system(h: float, rks: list[float], order: int, variant: str) -> tuple[float, float, np.ndarray, np.ndarray]:
    """h·φ_1(−h), B(h), and the linear system R ρ = b of UniPC (Zhao et al. 2023, Algorithm 2/3, data prediction).

    rks: the ratios r_k = (λ_{s_k} − λ_s0)/h of the earlier points, followed by 1. Coefficients as diffusers'
    UniPCMultistepScheduler (B(h) = e^{−h} − 1 for "bh2", −h for "bh1")."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    B_h = math.expm1(hh) if variant == "bh2" else hh
    h_phi_k, fact = h_phi_1 / hh - 1, 1
    R, b = [], []
    for i in range(1, order + 1):
        R.append([r ** (i - 1) for r in rks])
        b.append(h_phi_k * fact / B_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    return h_phi_1, B_h, np.array(R, dtype=np.float64), np.array(b, dtype=np.float64)


def _unipc_update(x: torch.Tensor, s0: float, s_t: float, ms: list[torch.Tensor], lams: list[float], order: int,
                  variant: str, model_t: torch.Tensor | None = None) -> torch.Tensor:
    """One UniP predictor step (model_t None) or UniC corrector step from x at σ = s0 to σ = s_t.

    ms[-1] = D at s0, ms[-1-k] at λ = lams[-1-k] (lams aligned with ms)."""
    m0, h = ms[-1], _lam(s_t) - lams[-1]
    rks = [(lams[-1 - k] - lams[-1]) / h for k in range(1, order)]
    D1s = [(ms[-1 - k] - m0) / r for k, r in zip(range(1, order), rks)]
    h_phi_1, B_h, R, b = _unipc_system(h, rks + [1.0], order, variant)
    x_t = (s_t / s0) * x - h_phi_1 * m0
    if model_t is None:  # UniP: ρ solves the system without its last row/column
        rhos = [0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1]).tolist() if order > 2 else []
        res = sum((r * d for r, d in zip(rhos, D1s)), torch.zeros_like(x))
        return x_t - B_h * res
    rhos = [0.5] if order == 1 else np.linalg.solve(R, b).tolist()
    res = sum((r * d for r, d in zip(rhos[:-1], D1s)), torch.zeros_like(x))
    return x_t - B_h * (res + rhos[-1] * (model_t - m0))


@torch.no_grad()
def sample_unipc(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                 callback: Callable | None = None, disable: bool | None = None, order: int = 2,
                 variant: str = "bh2", lower_order_final: bool = True, use_corrector: bool = True) -> torch.Tensor:
    """UniPC (Zhao et al. 2023, Algorithms 2–3: the UniP-p predictor with the UniC corrector, data prediction),
    as diffusers' UniPCMultistepScheduler (bh2, order 2, lower-order warm-up and final step). The corrector reuses
    the model output at the predicted point, so UniPC costs one model call per step."""
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    if not 1 <= order <= 3:
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    sig = SigmaSteps(sigmas, x)
    n = len(sig) - 1
    ms: list[torch.Tensor] = []
    lams: list[float] = []
    x_last, last_order = None, 1
    for i in steps(n, disable):
        s, s_next = sig[i], sig[i + 1]
        denoised = call(model, x, sig, s, extra_args)
        report(callback, x, i, s, denoised)
        if use_corrector and x_last is not None:
            x = _unipc_update(x_last, sig[i - 1], s, ms, lams, last_order, variant, model_t=denoised)
        ms, lams = (ms + [denoised])[-order:], (lams + [_lam(s)])[-order:]
        this_order = min(order, n - i) if lower_order_final else order
        this_order = min(this_order, i + 1)
        x_last, last_order = x, this_order
        x = denoised if s_next == 0 else _unipc_update(x, s, s_next, ms, lams, this_order, variant)
    return x
