"""Offline image-generation metrics (no downloads): Fréchet distance and caption retrieval in the feature space of
the project's own CLIP, PSNR and SSIM for autoencoder reconstructions.

FID proper needs Inception-v3 weights, which cannot be downloaded here; ``scripts/evaluate.py`` computes it only when
a local weights file is given and says so otherwise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(m)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a^½ Σ_b Σ_a^½)^½) of features a (N, D) and b (M, D), in float64
    (Heusel et al. 2017, eq. 6 of the FID paper; the symmetric form avoids a non-symmetric square root)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    r = _sqrtm_psd(s_a)
    cross = _sqrtm_psd(r @ s_b @ r)
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * torch.trace(cross))


def retrieval_accuracy(image_features: torch.Tensor, text_features: torch.Tensor, k: int = 1) -> float:
    """Share of images i whose own caption i is among the k most similar of all N captions (features normalized).

    image_features, text_features: (N, D), row i of each belonging together.
    """
    sim = F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).T  # (N, N)
    topk = sim.topk(min(k, sim.shape[1]), dim=1).indices  # (N, k)
    return float((topk == torch.arange(sim.shape[0])[:, None]).any(1).float().mean())


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1], (B, C, H, W) -> (B,)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp(min=1e-12))


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) of images in [0, 1] with a Gaussian window, (B, C, H, W) -> (B,)."""
    c1, c2 = 0.01**2, 0.03**2
    coords = torch.arange(window, dtype=torch.float32) - window // 2
    g = torch.exp(-coords**2 / (2 * sigma**2))
    g = (g / g.sum()).to(x.device)
    kernel = (g[:, None] * g[None, :]).expand(x.shape[1], 1, window, window)  # (C, 1, w, w)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=x.shape[1])

    x, y = x.float(), y.float()
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)
