"""The tiny text-to-image model the sampling tests share (configs/tiny/txt2img.yaml)."""
from __future__ import annotations

import torch

import ldm
from ldm.model import LatentDiffusion

TINY = "configs/tiny/txt2img.yaml"


def tiny_with_signal(seed: int = 0) -> LatentDiffusion:
    """The tiny model with random weights where the original zero-initialises its output projections (which would
    hide the context and the skip paths), so that every path of the U-Net carries signal."""
    torch.manual_seed(seed)
    model = ldm.load(config=TINY)
    with torch.no_grad():
        for p in model.unet.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.02)
    return model
