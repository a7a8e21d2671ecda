"""The fast inference path: half precision, channels_last, fused attention projections, inductor settings for
convolution networks, ``torch.compile``.

Attention stays on PyTorch's SDPA dispatch: on an H200 with torch 2.11 it already runs cuDNN's fused kernel (the
fastest of the card's three at the U-Net's shapes, docs/BENCHMARKS.md); the ``"cudnn"`` backend forces that order on
builds that pick flash first, at 25–60 µs of Python per call in eager mode (free once compiled).

``optimize(model)`` is opt-in and changes no saved weight (the fused projections are non-persistent buffers);
outputs stay within fp16 tolerance of the eager path (scripts/bench.py measures the difference next to the speed).
Compile artefacts go to inductor's on-disk cache (``TORCHINDUCTOR_CACHE_DIR``, default under /tmp), so a second
process with the same shapes pays much less compile time.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

# Inductor settings for convolution-heavy U-Nets: 1×1 convolutions (the transformers' proj_in/proj_out, the
# ResBlocks' skip projections) as matmuls, fusable with their epilogues. (The diffusers guide adds
# coordinate-descent tuning, which costs minutes of compile time for a few per cent: pass it in ``flags`` to try.)
INDUCTOR_FLAGS = {"conv_1x1_as_mm": True}


def set_inductor_flags(flags: dict[str, Any] | None = None) -> None:
    """Apply :data:`INDUCTOR_FLAGS` (or ``flags``) to ``torch._inductor.config``: process-wide, read at compile."""
    import torch._inductor.config as cfg

    for k, v in (INDUCTOR_FLAGS if flags is None else flags).items():
        if not hasattr(cfg, k):
            log.warning("torch._inductor.config has no %r in torch %s; skipped", k, torch.__version__)
            continue
        setattr(cfg, k, v)


def optimize(model: Any, compile: bool = True, mode: str = "max-autotune-no-cudagraphs",
             fullgraph: bool = True, dynamic: bool = False, attention: str | None = None,
             fuse_projections: bool = True, inductor_flags: bool = True) -> Any:
    """Prepare a loaded :class:`ldm.model.LatentDiffusion` for fast sampling on a GPU.

    - U-Net and autoencoder in ``channels_last`` (the layout cuDNN's fast convolutions want);
    - ``attention``: switch the U-Net's attention backend (default: keep the config's);
    - ``fuse_projections``: q/k/v projections as one matmul (inference only: undo before training);
    - ``inductor_flags``: :data:`INDUCTOR_FLAGS` (process-wide);
    - ``torch.compile`` of the U-Net forward and the autoencoder decoder (``mode``: any torch.compile mode;
      "reduce-overhead" adds CUDA graphs for the fixed-shape denoising loop).
    Returns the same model object.
    """
    if attention is not None:
        model.unet.set_attention_backend(attention)
    backend = model.unet.attn_backend
    if fuse_projections:
        model.unet.fuse_projections()
    model.unet.to(memory_format=torch.channels_last)
    model.vae.to(memory_format=torch.channels_last)
    if compile:
        if inductor_flags:
            set_inductor_flags()
        unet, vae = model.unet, model.vae
        unet.forward = torch.compile(unet.forward, mode=mode, fullgraph=fullgraph, dynamic=dynamic)
        vae.decoder.forward = torch.compile(vae.decoder.forward, mode=mode, fullgraph=fullgraph, dynamic=dynamic)
    log.info("fast path: attention %s, fused projections %s, compiled %s (mode=%s)", backend, fuse_projections,
             compile, mode if compile else "-")
    return model
