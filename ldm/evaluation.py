"""Offline image-generation metrics (no downloads): Fréchet distance and caption retrieval in the feature space of
the project's own CLIP, PSNR and SSIM for autoencoder reconstructions.

FID proper needs Inception-v3 weights, which cannot be downloaded here; ``scripts/evaluate.py`` computes it only when
a local weights file is given and says so otherwise.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖μ_a − μ_b‖² + Tr Σ_a + Tr Σ_b − 2 Tr (Σ_a Σ_b)^½ of features a (N, D) and b (M, D), in float64
    (Heusel et al. 2017, eq. 6 of the FID paper).

    Tr (Σ_a Σ_b)^½ is the sum of the square roots of the (real, non-negative) eigenvalues of Σ_a Σ_b. With A, B the
    centred features, Σ_a Σ_b = Aᵀ(A Bᵀ B)/k, k = (N−1)(M−1), whose non-zero eigenvalues are those of
    (A Bᵀ)(A Bᵀ)ᵀ / k, so the trace is ‖A Bᵀ‖_* / √k (exact; used when min(N, M) <= D); otherwise
    Tr (Σ_a^½ Σ_b Σ_a^½)^½ from symmetric eigendecompositions (no non-symmetric square root either way).
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D), got {tuple(a.shape)} and {tuple(b.shape)}")
    n, m, d = a.shape[0], b.shape[0], a.shape[1]
    if n < 2 or m < 2:
        raise ValueError(f"a Fréchet distance needs at least 2 samples per set, got {n} and {m}")
    check_finite("a", a)
    check_finite("b", b)
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    ac, bc = a - mu_a, b - mu_b
    tr_a, tr_b = ac.pow(2).sum() / (n - 1), bc.pow(2).sum() / (m - 1)
    if min(n, m) <= d:
        tr_covmean = torch.linalg.svdvals(ac @ bc.T).sum() / math.sqrt((n - 1) * (m - 1))
    else:
        w, v = torch.linalg.eigh(ac.T @ ac / (n - 1))
        root_a = (v * w.clamp(min=0).sqrt()) @ v.T
        tr_covmean = torch.linalg.eigvalsh(root_a @ (bc.T @ bc / (m - 1)) @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + tr_a + tr_b - 2 * tr_covmean)


def check_finite(name: str, features: torch.Tensor) -> None:
    """Raise ValueError naming ``name`` when rows of ``features`` (N, ...) hold NaN or ±inf (e.g. a diverged model's
    images): they would otherwise surface as an unrelated linear-algebra error or a silent NaN."""
    bad = ~torch.isfinite(features).flatten(1).all(1)
    if bad.any():
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(f"{name}: {len(rows)} of {len(features)} rows hold NaN or inf values (rows {rows[:8]}"
                         f"{' …' if len(rows) > 8 else ''})")


def _check_pair(x: torch.Tensor, y: torch.Tensor, what: str) -> None:
    if x.shape != y.shape:
        raise ValueError(f"{what}: x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dim() != 4:
        raise ValueError(f"{what}: images must be (B, C, H, W), got shape {tuple(x.shape)}")


def distinct_captions(captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first, target)`` for N captions: ``first`` (U,) the row of each distinct caption's first occurrence, in
    order, and ``target`` (N,) the index into ``first`` of every row's caption."""
    index: dict[str, int] = {}  # caption -> its index among the distinct captions
    first: list[int] = []
    for row, caption in enumerate(captions):
        if caption not in index:
            index[caption] = len(first)
            first.append(row)
    target = [index[c] for c in captions]
    return torch.tensor(first, dtype=torch.long), torch.tensor(target, dtype=torch.long)


def retrieval_accuracy(image_features: torch.Tensor, text_features: torch.Tensor, k: int = 1,
                       captions: Sequence[str] | None = None) -> float:
    """Image→text recall@k: the share of images i whose own caption is among the k distinct captions most similar
    to image i (cosine similarity of the features).

    image_features, text_features: (N, D), row i of each belonging together.
    captions: the N caption strings. The candidates are the *distinct* captions: rows with identical text are one
    candidate (its first row's features), and it is correct for every image with that caption, so a model is not
    marked wrong for retrieving the duplicate of its caption, and a repeated wrong caption takes one of the k places,
    not several. Without ``captions`` every row is its own candidate, correct only for image i.
    """
    if image_features.dim() != 2 or image_features.shape != text_features.shape:
        raise ValueError(f"image_features and text_features must both be (N, D), row i of each belonging together, "
                         f"got {tuple(image_features.shape)} and {tuple(text_features.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n = image_features.shape[0]
    if captions is not None and len(captions) != n:
        raise ValueError(f"captions: {len(captions)} for {n} feature rows")
    first, target = distinct_captions(captions) if captions is not None else (torch.arange(n), torch.arange(n))
    texts = F.normalize(text_features[first.to(text_features.device)].float(), dim=-1)  # (U, D)
    sim = F.normalize(image_features.float(), dim=-1) @ texts.T  # (N, U)
    topk = sim.topk(min(k, sim.shape[1]), dim=1).indices.cpu()  # (N, k)
    return float((topk == target[:, None]).any(1).float().mean())


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1], (B, C, H, W) -> (B,)."""
    _check_pair(x, y, "psnr")
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp(min=1e-12))


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) of images in [0, 1] with a Gaussian window, (B, C, H, W) -> (B,)."""
    _check_pair(x, y, "ssim")
    if min(x.shape[-2:]) < window:
        raise ValueError(f"ssim: images of {tuple(x.shape[-2:])} pixels are smaller than the {window}×{window} window")
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
