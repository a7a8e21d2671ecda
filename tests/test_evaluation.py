"""Offline metrics against independent references (scipy's sqrtm FID formula, scikit-image's SSIM)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.evaluation import frechet_distance, psnr, retrieval_accuracy, ssim


def test_frechet_distance_matches_the_scipy_formula():
    from scipy import linalg

    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 8, generator=g, dtype=torch.float64)
    b = torch.randn(400, 8, generator=g, dtype=torch.float64) * 1.3 + 0.5
    mu1, mu2 = a.mean(0).numpy(), b.mean(0).numpy()
    s1, s2 = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_retrieval_accuracy():
    f = torch.eye(5)
    assert retrieval_accuracy(f, f) == 1.0
    assert retrieval_accuracy(f, f.roll(1, 0)) == 0.0
    assert retrieval_accuracy(f + 0.1, f.roll(1, 0), k=5) == 1.0


def test_psnr_and_ssim_match_scikit_image():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g)
    y = (x + 0.05 * torch.randn(2, 3, 32, 32, generator=g)).clamp(0, 1)
    for i in range(2):
        a, b = x[i].permute(1, 2, 0).numpy(), y[i].permute(1, 2, 0).numpy()
        assert psnr(x, y)[i].item() == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0), rel=1e-4)
        ref = structural_similarity(a, b, data_range=1.0, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False)
        assert ssim(x, y)[i].item() == pytest.approx(ref, abs=2e-3)
