"""Stage 1: train the KL autoencoder (Rombach et al. 2022, App. G; Esser et al. 2021) with manual optimization.

The losses live in :mod:`ldm.autoencoder.losses`; this module wires them to Lightning 2 (no ``optimizer_idx``):
per batch, a generator step (AE weights + the loss's learned ``logvar``) and, from ``disc_start`` on, a
discriminator step, each through :func:`ldm.training.guard.guarded_step`. Adam β = (0.5, 0.9) as the original.
The discriminator's step reuses this batch's reconstruction x̂ (detached) from before the generator's update; the
original (PyTorch Lightning 1.x, one ``training_step`` per optimizer) encoded and decoded the batch again after it.

``trainer.global_step`` counts generator steps (= batches, as in the original LDM, whose ``disc_start: 50001`` and
checkpoint intervals mean batches): the discriminator's update goes through the strategy directly so that Lightning
does not count it as a second step. Posterior samples come from a generator seeded by (seed, step, rank), so a resumed
run reproduces the uninterrupted one exactly.

Multi-GPU: the discriminator takes no part in the generator loss before ``disc_start`` and the AE none in the
discriminator loss, so DDP needs ``trainer.strategy: ddp_find_unused_parameters_true``.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from ldm.autoencoder.distributions import DiagonalGaussianDistribution
from ldm.lr_schedule import advance, linear_warmup
from ldm.registry import ConfigError, instantiate
from ldm.training.datamodule import check_buckets
from ldm.training.guard import StepGuard, guarded_step
from ldm.training.modes import eval_mode
from ldm.training.optim import accumulate_batches, effective_lr, step_generator, use_fused
from ldm.training.stage import ResumableStage
from ldm.training.step_log import log_step

log = logging.getLogger(__name__)

DEFAULT_LOSS = {"target": "LPIPSWithDiscriminator", "params": {}}


HALF_WEIGHTS = ("16-true", "bf16-true")  # Lightning precisions that cast the weights themselves to 16 bits


def check_precision(config: DictConfig) -> None:
    """Refuse half-precision *weights*: the discriminator and LPIPS would get the fp32 inputs of the losses (a crash
    only once the GAN switches on, at ``disc_start``), and Adam's lr-sized updates round away in 16-bit weights (the
    original trained in fp32). Mixed precision (``bf16-mixed``, ``16-mixed``) keeps fp32 weights and is fine."""
    precision = str((config.get("trainer") or {}).get("precision", "32-true"))
    if precision in HALF_WEIGHTS:
        raise ConfigError(f"train.stage=autoencoder: trainer.precision={precision} is not supported (16-bit weights: "
                          "the fp32 losses cannot run the discriminator/LPIPS, and small updates round away); use "
                          "bf16-mixed or 16-mixed")


class UncountedStep:
    """An optimizer handle for :func:`guarded_step` whose ``step`` runs through the strategy (precision plugin,
    AMP grad scaler) but not through ``LightningOptimizer.step``, which would advance ``trainer.global_step``."""

    def __init__(self, module: L.LightningModule, optimizer: Any) -> None:
        self.module = module
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer inside LightningOptimizer

    def step(self) -> None:
        self.module.trainer.strategy.optimizer_step(self.optimizer, closure=lambda: None)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)


def _adam(module: Any, params: Iterable[torch.nn.Parameter], lr: float, t: DictConfig) -> torch.optim.Adam:
    params = list(params)
    fused = use_fused(module, params, t)
    return torch.optim.Adam(params, lr=lr, betas=tuple(t.get("betas", (0.5, 0.9))), eps=float(t.get("eps", 1e-8)),
                            weight_decay=float(t.get("weight_decay", 0.0)), fused=fused or None)


def loss_config(config: DictConfig) -> tuple[Any, str]:
    """The loss's config and its key: ``train.loss``, else the original YAML's ``model.params.lossconfig`` (its
    ``ldm.modules.losses.LPIPSWithDiscriminator`` target and parameters are read as they are; the inference configs'
    ``torch.nn.Identity`` stands for none), else :data:`DEFAULT_LOSS`. Both set is refused: one would be ignored."""
    ours = config.train.get("loss")
    original = ((config.model.get("params") or {}).get("lossconfig")) if config.get("model") else None
    if original and original.get("target") == "torch.nn.Identity":  # the inference configs' placeholder
        original = None
    if ours and original:
        raise ConfigError("train.loss and model.params.lossconfig (the original YAML's) are both set: keep one (the "
                          "other would be ignored)")
    if original:
        return original, "model.params.lossconfig"
    return ours or DEFAULT_LOSS, "train.loss"


class AutoencoderModule(ResumableStage, L.LightningModule):
    """Trains ``autoencoder`` (``config.model``, an ``AutoencoderKL``) with ``loss`` (``config.train.loss``)."""

    def __init__(self, config: DictConfig) -> None:
        super().__init__()
        from ldm.autoencoder.losses import LPIPSWithDiscriminator  # noqa: PLC0415
        from ldm.autoencoder.model import AutoencoderKL  # noqa: PLC0415

        self.config = config
        t = config.train
        self.automatic_optimization = False
        self.autoencoder = instantiate(config.model, "model")
        if not isinstance(self.autoencoder, AutoencoderKL):
            raise ConfigError("train.stage=autoencoder: model.target must be AutoencoderKL")
        loss, where = loss_config(config)
        self.loss = instantiate(loss, where)
        if not isinstance(self.loss, LPIPSWithDiscriminator):
            raise ConfigError(f"{where}.target must be LPIPSWithDiscriminator")
        check_buckets(config, "autoencoder", self.autoencoder.downsample_factor)
        check_precision(config)
        if accumulate_batches(config) > 1:  # the generator's backward writes into D's gradients, zeroed before D's
            raise ConfigError("train.stage=autoencoder: trainer.accumulate_grad_batches is not supported (two "
                              "optimizers share the discriminator's gradients); raise data.batch_size instead")
        self.guard = StepGuard(int(t.get("max_consecutive_nonfinite", 10)))
        self.batches_seen = 0  # data position: batches consumed, saved in checkpoints for exact resume

    # -- optimizers ----------------------------------------------------------------------------------------
    def generator_parameters(self) -> list[torch.nn.Parameter]:
        """AE weights + the loss's trained ``logvar`` (the original optimizer left it out, so it never moved)."""
        return [p for p in self.autoencoder.parameters() if p.requires_grad] + self.loss.autoencoder_parameters()

    def configure_optimizers(self) -> Any:
        t = self.config.train
        lr = effective_lr(self, t)
        opt_g = _adam(self, self.generator_parameters(), lr, t)
        opt_d = _adam(self, self.loss.discriminator_parameters(), lr * float(t.get("disc_lr_mult", 1.0)), t)
        warm = int(t.get("warmup_steps", 0))
        scheds = [{"scheduler": torch.optim.lr_scheduler.LambdaLR(o, linear_warmup(warm)), "interval": "step"}
                  for o in (opt_g, opt_d)]
        return [opt_g, opt_d], scheds

    # -- training ------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        t = self.config.train
        self.batches_seen += 1
        step = self.global_step  # generator steps so far; the GAN switches on at loss.disc_start
        (opt_g, opt_d), (sched_g, sched_d) = self.optimizers(), self.lr_schedulers()
        x = batch["image"].to(self.device)  # (B, 3, S, S) in [-1, 1]
        gen = step_generator(self, int(t.get("seed", 0)))
        x_rec, posterior = self.autoencoder(x, sample_posterior=True, generator=gen)  # (B, 3, S, S)
        # the losses (pixel sums, KL, discriminator) in fp32 also under bf16/fp16 autocast
        x_rec, posterior = x_rec.float(), DiagonalGaussianDistribution(posterior.parameters.float())
        with torch.autocast(self.device.type, enabled=False):
            g_loss, logs = self.loss(x.float(), x_rec, posterior, 0, step,
                                     last_layer=self.autoencoder.get_last_layer(), split="train")
        check = bool(t.get("check_finite", True))
        if guarded_step(self, opt_g, g_loss, self.generator_parameters(), clip=t.get("grad_clip"), check_grads=check):
            advance(sched_g)
        if step >= self.loss.disc_start:
            opt_d.zero_grad(set_to_none=True)  # the generator's backward through D(x̂) left gradients here
            with torch.autocast(self.device.type, enabled=False):
                d_loss, d_logs = self.loss(x.float(), x_rec.detach(), posterior, 1, step, split="train")
            logs.update(d_logs)
            if guarded_step(self, UncountedStep(self, opt_d), d_loss, self.loss.discriminator_parameters(),
                            clip=t.get("grad_clip"), check_grads=check):
                advance(sched_d)
        self._log_step(logs)
        self._maybe_save_reconstructions(x, x_rec)
        return g_loss.detach()

    @torch.no_grad()
    def validation_metrics(self, batch: dict[str, Any], gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Per image (B,): L1 and PSNR (dB, images in [-1, 1]) of the reconstruction from the posterior mode, and
        the KL term (``ldm.training.validation``)."""
        ae = self.autoencoder
        x = batch["image"].to(self.device).float()  # (B, 3, H, W)
        with eval_mode(ae):
            posterior = ae.encode(x.to(next(ae.parameters()).dtype))
            x_rec = ae.decode(posterior.mode()).float().clamp(-1, 1)  # (B, 3, H, W)
        mse = (x - x_rec).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
        return {"l1": (x - x_rec).abs().mean(dim=(1, 2, 3)), "psnr": 10 * torch.log10(4.0 / mse),
                "kl": posterior.kl().float()}

    def _log_step(self, logs: dict[str, torch.Tensor]) -> None:
        values = {"train/loss": logs["train/total_loss"]}
        values.update({k: v.float() for k, v in logs.items() if k != "train/total_loss"})
        values["train/skipped"] = self.guard.skipped
        values["train/amp_skipped"] = self.guard.amp_skipped
        log_step(self, values, bar=("train/loss",))

    @torch.no_grad()
    def _maybe_save_reconstructions(self, x: torch.Tensor, x_rec: torch.Tensor) -> Path | None:
        """Every ``train.image_every_n_steps``: inputs (top row) over reconstructions (bottom row), rank 0."""
        every = int(self.config.train.get("image_every_n_steps", 0) or 0)
        step = self.global_step
        if every <= 0 or step == 0 or step % every or not self.trainer.is_global_zero:
            return None
        from ldm.data.transforms import to_pil  # noqa: PLC0415
        from ldm.grid import make_grid  # noqa: PLC0415

        n = min(8, x.shape[0])
        images = [to_pil(im) for im in torch.cat([x[:n], x_rec[:n]])]
        grid = make_grid(images, ncols=n, captions=[""] * len(images))  # captions=None fails in ldm.grid
        out = Path(self.trainer.default_root_dir) / "samples" / f"rec_{step:08d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        grid.save(out)
        for lg in self.trainer.loggers:
            exp = getattr(lg, "experiment", None)
            if hasattr(exp, "add_image"):
                import numpy as np  # noqa: PLC0415

                exp.add_image("reconstructions", np.asarray(grid).transpose(2, 0, 1), step)
        return out

    # -- checkpoints and export ----------------------------------------------------------------------------

    @torch.no_grad()
    def latent_statistics(self, batches: Iterable[dict[str, Any]], max_batches: int) -> tuple[float, float] | None:
        """Mean and std of posterior samples z ~ q(z|x) over up to ``max_batches`` batches, computed exactly from
        the posterior moments (E z = E μ, E z² = E(μ² + σ²)) so no noise is drawn; None when no batch came."""
        n, s, s2 = 0, torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        for i, batch in enumerate(batches):
            if i >= max_batches:
                break
            q = self.autoencoder.encode(batch["image"].to(self.device, next(self.autoencoder.parameters()).dtype))
            mean, var = q.mean.double().cpu(), q.var.double().cpu()  # (B, C, h, w)
            n, s, s2 = n + mean.numel(), s + mean.sum(), s2 + (mean.pow(2) + var).sum()
        if n == 0:
            return None
        mu = s / n
        return float(mu), float(torch.sqrt(torch.clamp(s2 / n - mu * mu, min=1e-12)))

    def export(self, path: str) -> str:
        """Write the autoencoder's state dict (original keys, no prefix) as safetensors, with the resolved config
        and, when a datamodule is attached, ``latent_mean``/``latent_std`` measured over ``train.latent_std_batches``
        batches (default 4; 0 turns it off) — 1/latent_std is the diffusion stage's ``scale_factor``."""
        from ldm import __version__  # noqa: PLC0415
        from ldm.checkpoint import META_CONFIG, save_safetensors  # noqa: PLC0415

        meta = {META_CONFIG: json.dumps(OmegaConf.to_container(self.config, resolve=True)), "ldm_version": __version__,
                "stage": "autoencoder"}
        stats = self._export_stats()
        if stats is not None:
            meta["latent_mean"], meta["latent_std"] = f"{stats[0]:.6g}", f"{stats[1]:.6g}"
            log.info("autoencoder latents: mean %.4f, std %.4f (scale_factor ≈ %.5f)", stats[0], stats[1], 1 / stats[1])
        return str(save_safetensors(self.autoencoder.state_dict(), path, meta))

    def _export_stats(self) -> tuple[float, float] | None:
        n = int(self.config.train.get("latent_std_batches", 4))
        trainer = self._trainer
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        if n <= 0 or dm is None or not hasattr(dm, "scale_batches"):
            return None
        with eval_mode(self.autoencoder):
            return self.latent_statistics(dm.scale_batches(), n)
