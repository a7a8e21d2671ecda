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


def test_retrieving_the_duplicate_of_its_caption_is_a_hit():
    """Images 0 and 1 share the caption "a" (identical text features): whichever of the two equal rows the ranking
    puts first, one of the two images used to be scored a miss (3/4); both retrieve their caption."""
    e = torch.eye(3)
    texts = torch.stack([e[0], e[0], e[1], e[2]])  # (4, 3): rows 0 and 1 are the same caption
    captions = ["a", "a", "b", "c"]
    assert retrieval_accuracy(texts, texts, 1, captions) == 1.0
    assert retrieval_accuracy(texts, texts, 1) == 0.75  # without captions, every row is its own candidate


def test_a_repeated_wrong_caption_takes_one_of_the_k_places():
    """Image 3 (caption "c") ranks "a" (twice in the split), then "b", then its own: third among the 3 distinct
    captions, a hit at k=3; over the 4 rows, where "a" took two places, it was fourth (a miss)."""
    texts = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    image = torch.tensor([[0.8, 0.5, 0.3]])  # cosine order: a, a, b, c
    images = torch.cat([texts[:3], image])
    captions = ["a", "a", "b", "c"]
    assert retrieval_accuracy(images, texts, 3, captions) == 1.0
    assert retrieval_accuracy(images, texts, 2, captions) == 0.75
    assert retrieval_accuracy(images, texts, 3) == 0.75


def test_retrieval_accuracy_needs_one_caption_per_row():
    with pytest.raises(ValueError, match="captions: 3 for 4 feature rows"):
        retrieval_accuracy(torch.eye(4), torch.eye(4), 1, ["a", "b", "c"])
