"""Classifier-free guidance (Ho & Salimans 2022) as one wrapper over the whole denoiser output.

D_cfg(x, σ) = D(x, σ | ∅) + s · (D(x, σ | c) − D(x, σ | ∅)), over all channels, with the conditional and the
unconditional branch evaluated in ONE batched call. Since D is affine in the network output at fixed (x, σ), guiding
x̂0 equals guiding ε or v (the usual implementations) exactly.

Guidance rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", §3.4, eqs. 15–17):
    x_rescaled = x_cfg · std(x_pos) / std(x_cfg),   x_final = φ · x_rescaled + (1 − φ) · x_cfg,
with std over each sample's elements. The paper writes these for "the model prediction"; we apply them to the x̂0
prediction D (the image whose over-exposure is corrected), which makes the result independent of whether the
network predicts ε, v or x0. diffusers applies them to the raw ε/v output instead; the two differ because the
rescale is not affine.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn


def rescale_guidance(d_cfg: torch.Tensor, d_pos: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al. 2023, eqs. 15–17. d_cfg, d_pos: (B, ...); φ in [0, 1] (0: no-op)."""
    if phi == 0:
        return d_cfg
    dims = tuple(range(1, d_cfg.ndim))
    std_pos = d_pos.std(dim=dims, keepdim=True)  # (B, 1, ...)
    std_cfg = d_cfg.std(dim=dims, keepdim=True)  # (B, 1, ...)
    rescaled = d_cfg * (std_pos / std_cfg)  # eq. 16
    return phi * rescaled + (1 - phi) * d_cfg  # eq. 17


def _batch_cond(cond: Mapping[str, Any], uncond: Mapping[str, Any]) -> dict[str, Any]:
    """{key: cat([uncond[key], cond[key]])} — both dicts must have the same keys."""
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond must have the same keys, got {sorted(cond)} and {sorted(uncond)}")
    out = {}
    for k in cond:
        c, u = cond[k], uncond[k]
        if c is None and u is None:
            continue
        if not (torch.is_tensor(c) and torch.is_tensor(u)):
            raise ValueError(f"cond[{k!r}] and uncond[{k!r}] must both be tensors (or both None)")
        out[k] = torch.cat([u, c])  # (2B, ...)
    return out


def _shared_cond(denoiser: Any, cond: Mapping[str, Any], uncond: Mapping[str, Any]) -> dict[str, Any] | None:
    """The keyword inputs of ``denoiser(x, σ, repeat=2, ...)`` when both branches differ only in their context and
    the denoiser :attr:`supports_repeat` (``UNetModel.forward``'s ``repeat``): the context batched [uncond; cond],
    every other input once (the same object in both, e.g. an inpainting ``concat``). None otherwise."""
    if not getattr(denoiser, "supports_repeat", False) or set(cond) != set(uncond):
        return None
    if not (torch.is_tensor(cond.get("context")) and torch.is_tensor(uncond.get("context"))):
        return None
    if any(cond[k] is not uncond[k] for k in cond if k != "context"):
        return None
    return {**{k: v for k, v in cond.items() if k != "context" and v is not None},
            "context": torch.cat([uncond["context"], cond["context"]])}  # (2B, L, D)


class CFGDenoiser(nn.Module):
    """Wraps ``D(x, σ, **cond) -> x̂0`` into ``D_cfg(x, σ, cond, uncond, scale, rescale)``."""

    def __init__(self, denoiser: nn.Module | Callable) -> None:
        super().__init__()
        self.inner_model = denoiser

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, Any],
                uncond: Mapping[str, Any] | None = None, scale: float = 1.0, rescale: float = 0.0) -> torch.Tensor:
        """x: (B, C, ...); sigma: (B,); cond/uncond: keyword inputs of D, e.g. {"context": (B, L, D)} and, for
        inpainting models, {"concat": (B, 5, h, w)}. scale: the guidance weight s (1: conditional only, one pass);
        rescale: φ of guidance rescale. Returns x̂0 (B, C, ...)."""
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"rescale must be in [0, 1], got {rescale}")
        if scale == 1.0 or uncond is None:
            return self.inner_model(x, sigma, **cond)
        B = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(B)  # (B,)
        shared = _shared_cond(self.inner_model, cond, uncond)
        if shared is not None:  # one x for both contexts: the layers before the first context reader run once
            both = self.inner_model(x, sigma, repeat=2, **shared)  # (2B, C, ...): [uncond; cond]
        else:
            both = self.inner_model(torch.cat([x, x]), torch.cat([sigma, sigma]),  # (2B, C, ...): [uncond; cond]
                                    **_batch_cond(cond, uncond))
        d_u, d_c = both.chunk(2)  # (B, C, ...) each
        d_cfg = d_u + scale * (d_c - d_u)
        return rescale_guidance(d_cfg, d_c, rescale)
