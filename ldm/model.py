"""The latent diffusion model object: U-Net, autoencoder, text encoder and the discrete noise schedule.

Module names follow the original LDM ``LatentDiffusion`` (``model.diffusion_model``, ``first_stage_model``,
``cond_stage_model``) so that released Stable Diffusion state dicts load with ``strict=True`` without key mapping.
This class holds no training logic (see ``ldm.diffusion.lightning``) and no sampling loop (see ``ldm.pipeline``).
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
from torch import nn

from ldm.registry import ConfigError, instantiate

log = logging.getLogger(__name__)

# Keys of the original LatentDiffusion / DDPM constructors that only matter to the original training code.
# They are accepted (so original YAMLs load) and ignored by the model; anything else unknown is an error.
# (cond_stage_trainable is read by the diffusion training stage: ldm.diffusion.joint_text.)
IGNORED_LDM_PARAMS = frozenset({
    "num_timesteps_cond", "log_every_t", "first_stage_key", "cond_stage_key", "monitor", "cond_stage_trainable",
    "use_ema", "scale_by_std", "clip_denoised", "loss_type", "l_simple_weight", "original_elbo_weight",
    "v_posterior", "learn_logvar", "logvar_init", "concat_mode", "cond_stage_forward", "unet_trainable",
    "make_it_fit", "reset_ema", "reset_num_ema_updates", "load_ema", "ignore_keys", "load_only_unet",
    "first_stage_trainable", "ucg_training", "image_size", "channels", "finetune_keys", "use_positional_encodings",
})
CONDITIONING_KEYS = ("crossattn", "hybrid", "concat", "adm", None)


class DiffusionWrapper(nn.Module):
    """``model.diffusion_model``: routes conditioning into the U-Net the way the original wrapper does.

    ``crossattn``: context via cross-attention; ``concat``/``hybrid``: extra channels concatenated to x
    (inpainting: masked-image latents ‖ mask, 4 + 4 + 1 = 9 channels); ``adm``: a vector ``y``.
    """

    def __init__(self, diffusion_model: nn.Module, conditioning_key: str | None) -> None:
        super().__init__()
        self.diffusion_model = diffusion_model
        self.conditioning_key = conditioning_key

    @property
    def supports_repeat(self) -> bool:
        """Whether ``forward(..., repeat=G)`` shares x among G contexts (``UNetModel.forward``)."""
        return bool(getattr(self.diffusion_model, "supports_repeat", False))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None,
                concat: torch.Tensor | None = None, y: torch.Tensor | None = None, repeat: int = 1) -> torch.Tensor:
        if concat is not None:
            x = torch.cat([x, concat], dim=1)  # (B, C + C_concat, h, w)
        if repeat != 1:  # (G·B, ...) from x (B, ...) and context (G·B, L, D)
            return self.diffusion_model(x, t, context=context, y=y, repeat=repeat)
        return self.diffusion_model(x, t, context=context, y=y)


class LatentDiffusion(nn.Module):
    """A text-to-image latent diffusion model built from a config (ours or an original SD inference YAML)."""

    def __init__(self, unet_config: Mapping[str, Any], first_stage_config: Mapping[str, Any],
                 cond_stage_config: Mapping[str, Any], linear_start: float = 0.00085, linear_end: float = 0.012,
                 timesteps: int = 1000, beta_schedule: str = "linear", zero_terminal_snr: bool = False,
                 parameterization: str = "eps", scale_factor: float = 1.0, shift_factor: float = 0.0,
                 conditioning_key: str | None = "crossattn", scheduler_config: Mapping[str, Any] | None = None,
                 ckpt_path: str | None = None, **ignored: Any) -> None:
        super().__init__()
        unknown = set(ignored) - IGNORED_LDM_PARAMS
        if unknown:
            raise ConfigError(f"LatentDiffusion: unknown key(s) {sorted(unknown)}")
        if ckpt_path:
            raise ConfigError("LatentDiffusion: 'ckpt_path' in a config is not supported; pass the checkpoint to "
                              "ldm.load(checkpoint, config) instead")
        if parameterization not in ("eps", "v", "x0"):
            raise ConfigError(f"LatentDiffusion: parameterization must be eps, v or x0, got {parameterization!r}")
        if conditioning_key not in CONDITIONING_KEYS:
            raise ConfigError(f"LatentDiffusion: conditioning_key {conditioning_key!r} not in {CONDITIONING_KEYS}")
        self.parameterization = parameterization
        self.conditioning_key = conditioning_key
        self.scheduler_config = dict(scheduler_config) if scheduler_config else None
        self.model = DiffusionWrapper(instantiate(unet_config, "model.params.unet_config"), conditioning_key)
        self.first_stage_model = instantiate(first_stage_config, "model.params.first_stage_config")
        self.cond_stage_model = instantiate(cond_stage_config, "model.params.cond_stage_config")
        self.first_stage_model.scale_factor.fill_(scale_factor)
        self.first_stage_model.shift_factor.fill_(shift_factor)
        self._set_schedule(beta_schedule, timesteps, linear_start, linear_end, zero_terminal_snr)
        self.first_stage_model.eval().requires_grad_(False)

    def _set_schedule(self, kind: str, n: int, start: float, end: float, zero_snr: bool) -> None:
        from ldm.diffusion.schedules import make_betas, rescale_zero_terminal_snr  # noqa: PLC0415

        betas = make_betas(kind, n, linear_start=start, linear_end=end)
        if zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        alphas_cumprod = torch.cumprod(1.0 - torch.as_tensor(betas, dtype=torch.float64), 0)
        # Non-persistent: SD checkpoints carry their own schedule buffers, which ldm.checkpoint checks against these.
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)  # (T,) float64
        self.schedule_args = dict(beta_schedule=kind, timesteps=n, linear_start=start, linear_end=end,
                                  zero_terminal_snr=zero_snr)

    def _apply(self, fn: Any, recurse: bool = True) -> "LatentDiffusion":
        """``.to(dtype)``/``.half()`` must not round the schedule: ᾱ stays float64 (σ_min 0.0292 needs it)."""
        ac = self.alphas_cumprod
        super()._apply(fn, recurse)
        self.alphas_cumprod = ac.to(self.alphas_cumprod.device)
        return self

    # -- the three networks under the names users expect ------------------------------------------------------
    @property
    def unet(self) -> nn.Module:
        return self.model.diffusion_model

    @property
    def vae(self) -> nn.Module:
        return self.first_stage_model

    @property
    def text_encoder(self) -> nn.Module:
        return self.cond_stage_model

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def encode_text(self, prompts: list[str] | str, long: bool = False, emphasis: str | None = None) -> torch.Tensor:
        """Prompts (or one prompt) -> token-level context (B, 77, D) in the U-Net's dtype; ``long``: prompts past 75
        tokens in chunks, (B, k·77, D) (:mod:`ldm.conditioning.chunks`), where a text encoder offers it;
        ``emphasis`` ("original" or "no_norm"): prompts in the web UI's emphasis syntax, ``(text:1.2)``,
        ``[text]``, ``BREAK`` (:mod:`ldm.conditioning.emphasis`), in chunks as with ``long``."""
        from ldm.conditioning.emphasis import check_mode  # noqa: PLC0415

        check_mode(emphasis)
        prompts = [prompts] if isinstance(prompts, str) else prompts  # list("a cat") would be five prompts
        enc = self.cond_stage_model
        for asked, method, what in ((long, "encode_long", "encode long prompts in chunks"),
                                    (emphasis, "encode_weighted", "weight prompts (emphasis)")):
            if asked and not hasattr(enc, method):
                raise ValueError(f"{type(enc).__name__} cannot {what}")
        with torch.no_grad():
            if emphasis is not None:
                c = enc.encode_weighted(list(prompts), mode=emphasis)
            else:
                c = (enc.encode_long if long else enc)(list(prompts))
        return c.to(device=self.device, dtype=self.dtype)

    def denoiser(self) -> nn.Module:
        """``D(x, σ, **cond) -> x̂0`` over this model's discrete schedule (the interface every sampler uses)."""
        from ldm.diffusion.denoiser import DiscreteDenoiser  # noqa: PLC0415

        return DiscreteDenoiser(self.model, self.alphas_cumprod, parameterization=self.parameterization)

    def guided_denoiser(self) -> nn.Module:
        """D_cfg over :meth:`denoiser` (classifier-free guidance), one instance per model, kept outside the module
        tree (nothing new is saved or moved twice), so that ``ldm.fast.optimize(scope="denoiser")`` compiles its
        forward once for every later ``generate`` call."""
        guided = self.__dict__.get("_guided_denoiser")
        if guided is None:
            from ldm.diffusion.guidance import CFGDenoiser  # noqa: PLC0415

            guided = CFGDenoiser(self.denoiser())
            self.__dict__["_guided_denoiser"] = guided  # a plain attribute, not a registered submodule
        return guided

    def generate(self, prompts: list[str] | str, **kwargs: Any) -> Any:
        """Text-to-image (also img2img and inpainting); see :func:`ldm.pipeline.generate` for the arguments."""
        from ldm.pipeline import generate  # noqa: PLC0415

        return generate(self, prompts, **kwargs)
