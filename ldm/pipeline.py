"""Text-to-image, image-to-image and inpainting on a :class:`ldm.model.LatentDiffusion`.

The loop is: prompts → context; per-image seeded noise → x_T; σ schedule; a sampler over the guided denoiser
D_cfg(x, σ); latents → autoencoder decoder → images. Each image's noise comes from its own seed (seed + index), so an
image does not change with the batch size.
"""
from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ldm.pipeline_io import decode_latents, images_to_pil, to_image_tensor, to_mask_tensor

log = logging.getLogger(__name__)

SEED_LIMIT = 2 ** 62  # image i's noise and sampler generators are seeded with seed + i and seed + 10000 + i
DEFAULT_STRENGTH = 0.8  # img2img and inpainting: the fraction of the schedule re-noised


@dataclass
class GenerateArgs:
    """The validated arguments of one ``generate`` call (checked before any work is done)."""

    sampler: str = "dpmpp_2m"
    steps: int = 30
    guidance: float = 7.5
    guidance_rescale: float = 0.0
    seed: int | None = None
    height: int | None = None
    width: int | None = None
    eta: float | None = None
    strength: float = DEFAULT_STRENGTH
    sigmas: str = "auto"
    output: str = "pil"

    def validate(self, factor: int) -> None:
        from ldm.diffusion.samplers import SAMPLERS  # noqa: PLC0415
        from ldm.diffusion.schedules import SIGMA_KINDS  # noqa: PLC0415

        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(sorted(SAMPLERS))}")
        for name in ("steps", "height", "width", "seed"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral)):
                raise TypeError(f"{name} must be an integer, got {type(v).__name__} {v!r}")
            setattr(self, name, None if v is None else int(v))  # numpy integers too
        if self.steps <= 0:
            raise ValueError(f"steps must be positive, got {self.steps}")
        if self.seed is not None and abs(self.seed) >= SEED_LIMIT:
            raise ValueError(f"seed must be below 2**{SEED_LIMIT.bit_length() - 1} in magnitude (torch's generators "
                             f"take 64-bit seeds, and image i's are seeded with seed + i and seed + 10000 + i), "
                             f"got {self.seed}")
        for name in ("guidance", "guidance_rescale", "eta", "strength"):
            if getattr(self, name) is not None and not math.isfinite(float(getattr(self, name))):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if self.eta is not None and self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {self.guidance_rescale}")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (v <= 0 or v % factor):
                raise ValueError(f"{name} must be a positive multiple of {factor}, got {v}")
        if self.output not in ("pil", "latent", "tensor"):
            raise ValueError(f"output must be 'pil', 'latent' or 'tensor', got {self.output!r}")
        if self.sigmas not in ("auto", *SIGMA_KINDS):
            raise ValueError(f"sigmas must be auto or one of {', '.join(SIGMA_KINDS)}, got {self.sigmas!r}")


def denoising_steps(steps: int, strength: float) -> int:
    """How many of ``steps`` an img2img/inpainting call runs: ⌊steps · strength⌋ (the original img2img script's
    ``t_enc`` and diffusers' ``init_timestep``), at least one."""
    return max(1, min(steps, int(steps * strength)))


def seeded_noise(shape: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
    """(B, C, h, w) standard normal noise, image i drawn on the CPU from ``torch.Generator().manual_seed(seeds[i])``
    (device independent and batch-size independent)."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds])


class MaskedDenoiser(nn.Module):
    """Inpainting with any model: the known region of x̂0 is replaced by the source latents, D' = m·D + (1−m)·z0."""

    def __init__(self, inner: nn.Module, z0: torch.Tensor, mask: torch.Tensor) -> None:
        super().__init__()
        self.inner, self.z0, self.mask = inner, z0, mask  # mask: (B, 1, h, w), 1 = repaint

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **kw: Any) -> torch.Tensor:
        return self.mask * self.inner(x, sigma, **kw) + (1 - self.mask) * self.z0


def _sigmas(model: Any, a: GenerateArgs) -> torch.Tensor:
    from ldm.diffusion.schedules import get_sigmas  # noqa: PLC0415

    kind = a.sigmas
    if kind == "auto":
        # DDPM: the DDIM timesteps but ending at σ = 0 ("leading"), not at σ(ᾱ_0) > 0: Ho et al.'s last step adds no
        # noise (Algorithm 2, z = 0 at t = 1), as the original p_sample_loop and diffusers' DDPMScheduler, while a
        # step to σ(ᾱ_0) > 0 draws fresh noise of std ≈ σ(ᾱ_0) that would stay in the image.
        kind = ("leading" if a.sampler == "ddpm" else "ddim" if a.sampler in ("ddim", "plms")
                else "karras" if a.sampler.startswith("dpmpp") else "discrete")
    return get_sigmas(model.alphas_cumprod, a.steps, kind)


def _conditioning(model: Any, prompts: list[str], negative: list[str], long: bool = False,
                  emphasis: str | None = None) -> tuple[dict, dict]:
    """Both branches' contexts from one text-encoder call (half the launches of two; each prompt is encoded on its
    own: no padding mask or cross-prompt attention couples the batch)."""
    # (options passed only when set: encode_text(prompts) is the interface other text encoders' models offer)
    options = {k: v for k, v in (("long", long), ("emphasis", emphasis)) if v}
    cu = model.encode_text(prompts + negative, **options)
    c, u = cu.split(len(prompts))  # (B, 77, D) each
    return {"context": c}, {"context": u}


@torch.no_grad()
def generate(model: Any, prompts: Sequence[str] | str, negative_prompts: Sequence[str] | str | None = None,
             sampler: str = "dpmpp_2m", steps: int = 30, guidance: float = 7.5, guidance_rescale: float = 0.0,
             seed: int | None = None, height: int | None = None, width: int | None = None,
             latents: torch.Tensor | None = None, eta: float | None = None, init_image: Any = None,
             strength: float | None = None,
             mask: Any = None, output: str = "pil", sigmas: str = "auto", progress: bool = True,
             long_prompts: bool = False, emphasis: str | None = None) -> Any:
    """Generate images.

    Args:
        prompts: one prompt or a list (B).
        negative_prompts: the unconditional branch of classifier-free guidance; default "" (as the models were trained).
        sampler: a name of ``ldm.diffusion.samplers.SAMPLERS`` (ddpm, ddim, plms, euler, euler_a, heun, lms, dpmpp_2m,
            dpmpp_2m_sde, dpmpp_2s_a, unipc).
        steps, guidance, guidance_rescale, eta: sampling settings (eta: DDIM η / ancestral noise scale; None: the
            sampler's default).
        seed: image i uses seed + i (random when None).
        height, width: pixels, multiples of the autoencoder's factor (default: the config's size).
        latents: (B, C, h, w) starting noise (unit variance), overriding the seed (compare with other implementations).
        init_image: img2img/inpainting source (PIL image(s) or a (B, 3, H, W) tensor in [-1, 1]); ``strength`` in (0, 1]
            is the fraction of the schedule that is re-noised (default 0.8; only with ``init_image``).
        mask: inpainting mask (PIL or (B, 1, H, W) tensor; 1/white = repaint).
        output: "pil" (list of PIL images), "tensor" ((B, 3, H, W) in [0, 1]) or "latent" ((B, C, h, w)).
        long_prompts: encode prompts past 75 tokens in chunks of 75 (the web UIs' way, contexts concatenated)
            instead of truncating them (the original scripts' and diffusers' way, the default). The batch's rows
            share the chunk count (:mod:`ldm.conditioning.chunks`): with prompts of different lengths an image can
            change with its batch.
        emphasis: None (the default: prompts are read literally, as by the original scripts and diffusers), or
            "original" / "no_norm": prompts and negative prompts in the AUTOMATIC1111 web UI's emphasis syntax,
            ``(text)`` ×1.1, ``[text]`` ÷1.1, ``(text:w)`` ×w, ``\\(`` a literal bracket, ``BREAK`` a new chunk;
            "original" restores each chunk's mean after weighting, as the web UI's default does
            (:mod:`ldm.conditioning.emphasis`). Prompts are then read in chunks of 75 tokens, as with
            ``long_prompts``.
        sigmas: σ schedule: "auto", "discrete", "karras", "exponential", "ddim", "leading" or "trailing" (see
            :func:`ldm.diffusion.schedules.get_sigmas`; "leading" is what diffusers' Euler/Heun/LMS schedulers use
            with SD's scheduler config).
    """
    from ldm.diffusion.samplers import sample  # noqa: PLC0415

    prompts, negative = _prompt_lists(prompts, negative_prompts)
    vae = model.vae
    f = vae.downsample_factor
    if strength is not None and init_image is None:
        raise ValueError("strength applies to img2img and inpainting: it needs init_image")
    a = GenerateArgs(sampler, steps, guidance, guidance_rescale, seed, height, width, eta,
                     DEFAULT_STRENGTH if strength is None else strength, sigmas, output)
    a.validate(f)
    if mask is not None and init_image is None:
        raise ValueError("mask needs init_image (the picture to inpaint)")
    C, in_ch = _unet_channels(model, inpainting=mask is not None)
    B = len(prompts)
    H, W = _size(model, a, latents)
    base = int(torch.randint(0, 2**31 - 1, ()).item()) if a.seed is None else a.seed
    noise = latents if latents is not None else seeded_noise((C, H // f, W // f), [base + i for i in range(B)])
    if tuple(noise.shape) != (B, C, H // f, W // f):
        raise ValueError(f"latents must be (B, C, h, w) = ({B}, {C}, {H // f}, {W // f}) for {B} prompt(s) at "
                         f"{W}x{H} px, got {tuple(noise.shape)}")
    noise = noise.to(model.device, torch.float32)  # (B, C, h, w)
    sig_cpu = _sigmas(model, a)  # (steps+1,) on the CPU: its last value is read without a device sync
    cond, uncond = _conditioning(model, prompts, negative, long_prompts, emphasis)
    start = _start(model, a, noise, sig_cpu.to(model.device), init_image, mask, in_ch == C + C + 1, (H, W))
    if start.concat is not None:  # a 9-channel inpainting model: conditioned on mask ‖ masked-image latents
        cond["concat"] = uncond["concat"] = start.concat
    guided: nn.Module = model.guided_denoiser()  # D_cfg over the model's D(x, σ)
    if start.mask is not None:  # outside the guidance wrapper: the mask has batch B, CFG runs on 2B
        guided = MaskedDenoiser(guided, start.z0, start.mask)
    extra = dict(cond=cond, uncond=uncond, scale=a.guidance, rescale=a.guidance_rescale)
    gens = [torch.Generator().manual_seed(base + 10_000 + i) for i in range(B)]
    z = sample(a.sampler, guided, start.x, start.sigmas, extra_args=extra, eta=a.eta, generators=gens,
               disable=not progress)
    if sig_cpu[-1] > 0:  # a schedule that ends above σ = 0 (DDIM's σ(ᾱ_0)): back to VP scale, as decoded
        z = z / math.sqrt(float(sig_cpu[-1]) ** 2 + 1)
    if isinstance(guided, MaskedDenoiser):
        z = guided.mask * z + (1 - guided.mask) * guided.z0
    if a.output == "latent":
        return z
    images = decode_latents(vae, z)  # (B, 3, H, W) in [0, 1]
    return images if a.output == "tensor" else images_to_pil(images)


def _prompt_lists(prompts: Sequence[str] | str, negative_prompts: Sequence[str] | str | None
                  ) -> tuple[list[str], list[str]]:
    """The prompts and their negative prompts as two lists of one length (negative default: "")."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: give a prompt or a list of prompts (\"\" for none)")
    negative = [""] * len(prompts) if negative_prompts is None else (
        [negative_prompts] * len(prompts) if isinstance(negative_prompts, str) else list(negative_prompts))
    if len(negative) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(negative)} negative prompts")
    return prompts, negative


def _unet_channels(model: Any, inpainting: bool) -> tuple[int, int]:
    """(C, in_ch): the U-Net's latent channels and input channels, checked against what ``generate`` can feed it."""
    C = model.unet.out_channels if hasattr(model.unet, "out_channels") else 4
    in_ch = model.unet.in_channels if hasattr(model.unet, "in_channels") else C
    if in_ch == C + C + 1 and not inpainting:
        raise ValueError(f"this is an inpainting model (its U-Net takes {in_ch} channels: latents, mask, masked "
                         "image): give init_image and mask")
    if in_ch not in (C, C + C + 1):
        raise ValueError(f"generate: a U-Net with {in_ch} input channels (e.g. depth-conditioned) needs conditioning "
                         "that generate does not make; only text-to-image and 9-channel inpainting models are sampled")
    return C, in_ch


def _size(model: Any, a: GenerateArgs, latents: torch.Tensor | None) -> tuple[int, int]:
    """(H, W) in pixels: ``height``/``width``, else the starting latents' size times the autoencoder's factor, else
    the config's size."""
    f = model.vae.downsample_factor
    if latents is not None and latents.dim() == 4:
        size_h, size_w = latents.shape[-2] * f, latents.shape[-1] * f
    else:
        size_h = size_w = model.config.model.params.get("image_size", 64) * f
    return a.height or size_h, a.width or size_w


@dataclass
class Start:
    """Where sampling starts: x at ``sigmas[0]``; for inpainting with any model the source latents ``z0`` and the
    latent ``mask`` (1 = repaint) that :class:`MaskedDenoiser` holds; for a 9-channel inpainting model ``concat``."""

    x: torch.Tensor  # (B, C, h, w)
    sigmas: torch.Tensor  # (n+1,)
    z0: torch.Tensor | None = None  # (B, C, h, w)
    mask: torch.Tensor | None = None  # (B, 1, h, w)
    concat: torch.Tensor | None = None  # (B, 1 + C, h, w)


def _start(model: Any, a: GenerateArgs, noise: torch.Tensor, sig: torch.Tensor, init_image: Any, mask: Any,
           nine_channel: bool, size: tuple[int, int]) -> Start:
    """Text-to-image from pure noise; img2img from the source latents z0 noised to the first σ of the last
    ⌊steps·strength⌋ steps; inpainting as img2img, with the mask for the model's kind."""
    pure = noise * torch.sqrt(sig[0] ** 2 + 1)  # pure noise in VP space, expressed in σ-space
    if init_image is None:
        return Start(pure, sig)
    vae, (H, W), f = model.vae, size, model.vae.downsample_factor
    B = noise.shape[0]
    img = to_image_tensor(init_image, B, H, W).to(model.device, model.dtype)  # (B, 3, H, W)
    z0 = vae.encode_latents(img).float()  # (B, C, h, w)
    sig = sig[a.steps - denoising_steps(a.steps, a.strength):]
    x = z0 + noise * sig[0]
    if mask is None:
        return Start(x, sig)
    m_px = to_mask_tensor(mask, B, H, W).to(model.device)  # (B, 1, H, W)
    m = torch.nn.functional.interpolate(m_px, size=(H // f, W // f), mode="nearest")  # (B, 1, h, w)
    if nine_channel:  # from pure noise at strength 1, as trained and as the original scripts and diffusers sample
        concat = torch.cat([m, vae.encode_latents(img * (m_px < 0.5)).float()], dim=1)
        return Start(pure if a.strength == 1.0 else x, sig, concat=concat)
    if a.strength == 1.0:  # the region to repaint from pure noise (diffusers too); the known region stays on
        x = m * pure + (1 - m) * x  # z0 + σ·ε (MaskedDenoiser)
    return Start(x, sig, z0=z0, mask=m)
