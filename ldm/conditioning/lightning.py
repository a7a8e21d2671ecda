"""Stage 0 (optional): contrastive image–text training of our own CLIP, whose text tower then conditions the U-Net.

The loss math is in :mod:`ldm.conditioning.contrastive`; this module wires it to Lightning: manual optimization
through :func:`ldm.training.guard.guarded_step`, AdamW with warm-up (no weight decay on gains, biases and the
temperature, as open_clip), t clamped to [0, ln 100] after each step, features gathered with
their gradients across ranks so that the negatives span the global batch, and ``batches_seen`` for exact resume.
"""
from __future__ import annotations

import json
import logging
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from ldm.conditioning.contrastive import (
    clamp_logit_scale_,
    clip_loss,
    clip_normalize,
    top1_accuracy,
)
from ldm.lr_schedule import advance, linear_warmup
from ldm.registry import ConfigError, instantiate
from ldm.training.datamodule import check_buckets
from ldm.training.guard import StepGuard, guarded_step
from ldm.training.optim import effective_lr, use_fused
from ldm.training.stage import ResumableStage
from ldm.training.step_log import log_step

log = logging.getLogger(__name__)


def no_decay(name: str, p: torch.nn.Parameter) -> bool:
    """open_clip's rule: gains, biases, the class embedding and ``logit_scale`` (all < 2-d) get no weight decay."""
    return p.ndim < 2 or "logit_scale" in name


def build_clip_optimizer(module: L.LightningModule, named: list[tuple[str, torch.nn.Parameter]],
                         t: DictConfig) -> dict[str, Any]:
    """AdamW over two groups (decayed / not decayed) with ``linear_warmup(train.warmup_steps)``."""
    if not named:
        raise ValueError("nothing to train: no parameter requires grad (model.params.freeze must be false)")
    decay = float(t.get("weight_decay", 0.2))
    groups = [{"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": decay},
              {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0}]
    fused = use_fused(module, [p for _, p in named], t)
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=effective_lr(module, t),
                            betas=tuple(t.get("betas", (0.9, 0.98))), eps=float(t.get("eps", 1e-6)),
                            fused=fused or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup(int(t.get("warmup_steps", 0))))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class CLIPModule(ResumableStage, L.LightningModule):
    """Trains both towers of an ``OpenCLIPTextEncoder(with_visual=True, freeze=False)`` (``config.model``)."""

    def __init__(self, config: DictConfig) -> None:
        super().__init__()
        from ldm.conditioning.text_encoder import OpenCLIPTextEncoder  # noqa: PLC0415

        self.config = config
        self.automatic_optimization = False
        self.encoder = instantiate(config.model, "model")
        if not isinstance(self.encoder, OpenCLIPTextEncoder) or not self.encoder.with_visual:
            raise ConfigError("train.stage=clip: model must be OpenCLIPTextEncoder with with_visual: true")
        if self.encoder.frozen:
            raise ConfigError("train.stage=clip: model.params.freeze must be false (nothing would train)")
        check_buckets(config, "clip", None)
        self.guard = StepGuard(int(config.train.get("max_consecutive_nonfinite", 10)))
        self.batches_seen = 0  # data position: batches consumed, saved in checkpoints for exact resume

    @property
    def logit_scale(self) -> torch.nn.Parameter:
        """The learned log-temperature t (s = exp t)."""
        return self.encoder.model.logit_scale

    def _named_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.encoder.named_parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        return build_clip_optimizer(self, self._named_params(), self.config.train)

    def features(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-normalized image and text features in fp32 (also under bf16/fp16 autocast), (B, E) each."""
        images = clip_normalize(batch["image"].to(self.device))  # (B, 3, S, S)
        img = self.encoder.encode_image(images)  # (B, E)
        txt = self.encoder.encode_text_features(list(batch["caption"]))  # (B, E)
        return F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        t = self.config.train
        self.batches_seen += 1
        opt, sched = self.optimizers(), self.lr_schedulers()
        img, txt = self.features(batch)
        with torch.autocast(self.device.type, enabled=False):  # the logits and softmax in fp32
            loss, logits, labels = clip_loss(img, txt, self.logit_scale.float().exp(), rank=self.global_rank,
                                             local_loss=bool(t.get("local_loss", False)))
        params = [p for _, p in self._named_params()]
        check = bool(t.get("check_finite", True))
        if guarded_step(self, opt, loss, params, clip=t.get("grad_clip"), check_grads=check):
            advance(sched)
            clamp_logit_scale_(self.logit_scale)
        log_step(self, {"train/loss": loss.detach(), "train/logit_scale": self.logit_scale.detach().exp(),
                        "train/acc_i2t": top1_accuracy(logits.detach(), labels), "train/lr": sched.get_last_lr()[0],
                        "train/skipped": self.guard.skipped, "train/amp_skipped": self.guard.amp_skipped},
                 bar=("train/loss", "train/acc_i2t"), last=("train/logit_scale",))  # a weight: after the step
        return loss.detach()


    @torch.no_grad()
    def validation_metrics(self, batch: dict[str, Any], gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Per sample (B,): the symmetric contrastive loss and image→text top-1 accuracy against the other samples
        of its batch (so they depend on the batch size; ``ldm.training.validation``)."""
        img, txt = self.features(batch)  # (B, E) each
        logits = self.logit_scale.float().exp() * img @ txt.T  # (B, B): image i against caption j
        labels = torch.arange(len(logits), device=logits.device)
        loss = 0.5 * (F.cross_entropy(logits, labels, reduction="none") +
                      F.cross_entropy(logits.T, labels, reduction="none"))
        return {"loss": loss, "acc_i2t": (logits.argmax(dim=1) == labels).float()}

    def export(self, path: str) -> str:
        """Write the encoder (both towers, keys ``model.*``) as safetensors with the resolved config.

        ``ldm.loading.load_component`` rebuilds it; the U-Net stage loads its text tower with
        ``train.components.cond_stage_model`` (the ``model.visual.*`` keys are ignored there).
        """
        from ldm import __version__  # noqa: PLC0415
        from ldm.checkpoint import META_CONFIG, save_safetensors  # noqa: PLC0415

        meta = {META_CONFIG: json.dumps(OmegaConf.to_container(self.config, resolve=True)), "ldm_version": __version__,
                "stage": "clip"}
        return str(save_safetensors(self.encoder.state_dict(), path, meta))
