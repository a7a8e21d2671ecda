"""The fast inference path: half precision, channels_last, fused attention projections, ``torch.compile``.

``optimize(model)`` is opt-in and changes no weights; outputs stay within fp16 tolerance of the eager path
(scripts/bench.py measures the difference next to the speed). Compile artefacts go to inductor's on-disk cache, so a
second process pays much less compile time.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


def optimize(model: Any, compile: bool = True, mode: str = "max-autotune-no-cudagraphs",
             fullgraph: bool = True, dynamic: bool = False) -> Any:
    """Prepare a loaded :class:`ldm.model.LatentDiffusion` for fast sampling on a GPU.

    - U-Net and autoencoder in ``channels_last`` (the layout cuDNN's fast convolutions want);
    - ``torch.compile`` of the U-Net forward and the autoencoder decoder (``mode``: any torch.compile mode;
      "reduce-overhead" adds CUDA graphs for the fixed-shape denoising loop).
    Returns the same model object.
    """
    model.unet.to(memory_format=torch.channels_last)
    model.vae.to(memory_format=torch.channels_last)
    if compile:
        unet, vae = model.unet, model.vae
        unet.forward = torch.compile(unet.forward, mode=mode, fullgraph=fullgraph, dynamic=dynamic)
        vae.decoder.forward = torch.compile(vae.decoder.forward, mode=mode, fullgraph=fullgraph, dynamic=dynamic)
        log.info("compiled U-Net and decoder (mode=%s); the first call of each shape compiles", mode)
    return model
