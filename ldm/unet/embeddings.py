"""Timestep and class embeddings of the U-Net.

The timestep t is turned into a vector with the sinusoidal embedding of "Attention Is All You Need" (§3.5), in the
exact layout of the original LDM ``timestep_embedding``: cosines first, then sines, frequencies
exp(-ln(max_period) · i / half) for i = 0 … half − 1. Released weights were trained with this layout, so it must
not change (diffusers calls it ``flip_sin_to_cos=True, freq_shift=0``).
"""
from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos(t·ω_i) ‖ sin(t·ω_i)], computed in fp32.

    Args:
        timesteps: (B,) float or integer timesteps (may be fractional).
        dim: embedding width; an odd width gets one zero column at the end.
        max_period: the longest period, 10000 in LDM.
    Returns:
        (B, dim) float32.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must have shape (B,), got {tuple(timesteps.shape)}")
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    omega = torch.exp(-math.log(max_period) * i / half)  # (half,)
    args = timesteps.float()[:, None] * omega[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2·half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)  # (B, dim)
    return emb


def time_mlp(model_channels: int, time_embed_dim: int) -> nn.Sequential:
    """``time_embed``: Linear → SiLU → Linear (keys ``time_embed.0`` and ``time_embed.2``)."""
    return nn.Sequential(
        nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
    )


def label_embedding(num_classes: int | str, time_embed_dim: int, adm_in_channels: int | None) -> nn.Module:
    """``label_emb``, added to the time embedding.

    - an int: ``nn.Embedding(num_classes, time_embed_dim)`` (class-conditional LDMs, the SD x4 upscaler's noise level);
    - ``"continuous"``: ``nn.Linear(1, time_embed_dim)``;
    - ``"sequential"``: an MLP over an ``adm_in_channels`` vector (SD 2 unCLIP), keys ``label_emb.0.0`` and
      ``label_emb.0.2``.
    """
    if isinstance(num_classes, bool):
        raise ValueError(f"num_classes must be an int, 'continuous' or 'sequential', got {num_classes!r}")
    if isinstance(num_classes, int):
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        return nn.Embedding(num_classes, time_embed_dim)
    if num_classes == "continuous":
        return nn.Linear(1, time_embed_dim)
    if num_classes == "sequential":
        if adm_in_channels is None:
            raise ValueError("num_classes='sequential' needs adm_in_channels (the width of the y vector)")
        return nn.Sequential(time_mlp(adm_in_channels, time_embed_dim))
    raise ValueError(f"num_classes must be an int, 'continuous' or 'sequential', got {num_classes!r}")
