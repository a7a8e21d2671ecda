"""Measure the latent scale (and optional shift) of a frozen autoencoder over many batches.

Stable Diffusion's 0.18215 is ≈ 1 / std of its KL-f8 latents; a model trained here measures its own value, stores it
in the model's config and checkpoint (``model.params.scale_factor``), and never inlines it.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable

import torch

log = logging.getLogger(__name__)


@torch.no_grad()
def latent_moments(vae: torch.nn.Module, batches: Iterable[dict[str, Any]], max_batches: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, Σz, Σz²) of the unscaled posterior samples over up to ``max_batches`` batches (float64 sums)."""
    n = torch.zeros((), dtype=torch.float64, device=device)
    s = torch.zeros((), dtype=torch.float64, device=device)
    s2 = torch.zeros((), dtype=torch.float64, device=device)
    dtype = next(vae.parameters()).dtype
    for i, batch in enumerate(batches):
        if i >= max_batches:
            break
        if "latent" in batch:
            z = batch["latent"].to(device, torch.float64)
        else:
            z = vae.encode(batch["image"].to(device, dtype)).sample().double()  # (B, C, h, w)
        n += z.numel()
        s += z.sum()
        s2 += (z * z).sum()
    return n, s, s2


def maybe_measure_scale(module: Any) -> None:
    """When ``train.scale_factor: auto``, measure scale = 1/std (and shift = mean if ``train.latent_shift``) across
    all ranks before the first step. Skipped on resume (the checkpoint carries the measured value)."""
    t = module.config.train
    if str(t.get("scale_factor", "config")) != "auto" or getattr(module, "_scale_measured", False):
        return
    if module.trainer.global_step > 0:
        return
    dm = module.trainer.datamodule
    if dm is None:
        raise ValueError("train.scale_factor=auto needs a datamodule to read batches from")
    n, s, s2 = latent_moments(module.net.first_stage_model, dm.scale_batches(), int(t.get("scale_batches", 50)),
                              module.device)
    stats = torch.stack([n, s, s2])
    if module.trainer.world_size > 1:
        stats = module.trainer.strategy.reduce(stats, reduce_op="sum")
    n, s, s2 = stats
    if n == 0:
        raise ValueError("train.scale_factor=auto: the data gave no batches to measure")
    mean = s / n
    std = torch.sqrt(torch.clamp(s2 / n - mean * mean, min=1e-12))
    shift = float(mean) if t.get("latent_shift", False) else 0.0
    scale = float(1.0 / std)
    module.set_latent_scale(scale, shift)
    module._scale_measured = True
    log.info("measured latent scale %.5f (std %.4f, mean %.4f) over %d values", scale, float(std), float(mean), int(n))
