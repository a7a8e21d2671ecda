"""Diffusion core: the discrete schedule, the denoiser D(x, σ) → x̂0, guidance, samplers and the training loss.

Everything a sampler sees is ``D(x, sigma, **cond) -> x0_hat`` over σ-space (x = x0 + σ·ε); see
:mod:`ldm.diffusion.denoiser`. Lightning wiring lives in :mod:`ldm.diffusion.lightning` (not imported here).
"""
from ldm.diffusion.denoiser import DiscreteDenoiser, get_scalings
from ldm.diffusion.guidance import CFGDenoiser, rescale_guidance
from ldm.diffusion.losses import diffusion_loss, min_snr_weight
from ldm.diffusion.samplers import SAMPLERS, sample
from ldm.diffusion.schedules import (DiscreteSchedule, get_sigmas, ldm_schedule_buffers, make_betas,
                                     rescale_zero_terminal_snr, sigmas_ddim, sigmas_exponential, sigmas_karras)

__all__ = [
    "CFGDenoiser", "DiscreteDenoiser", "DiscreteSchedule", "SAMPLERS", "diffusion_loss", "get_scalings", "get_sigmas",
    "ldm_schedule_buffers", "make_betas", "min_snr_weight", "rescale_guidance", "rescale_zero_terminal_snr", "sample",
    "sigmas_ddim", "sigmas_exponential", "sigmas_karras",
]
