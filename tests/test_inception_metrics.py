"""FID/KID from a local Inception-v3 file (ldm.inception_metrics), with a randomly initialised FID Inception saved to
tmp_path instead of the real weights (nothing can be downloaded here), checked against independent computations:
torch-fidelity's own extractor and KID, ldm.evaluation.frechet_distance, torchmetrics' and torch-fidelity's FID formulas.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from ldm.evaluation import frechet_distance
from ldm.inception_metrics import (
    WEIGHTS_FILENAME,
    fid_from_features,
    inception_metrics,
    kid_from_features,
    load_inception,
)

N = 10  # images per set; every image costs one 299×299 Inception forward on the CPU


pytestmark = pytest.mark.usefixtures("no_downloads")  # tests/conftest.py: any download fails the test


def smooth_images(n: int, seed: int, size: int = 64) -> torch.Tensor:
    """Linear two-colour gradients in random directions, (n, 3, size, size) in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    theta = torch.rand(n, 1, 1, generator=g) * 2 * math.pi
    t = theta.cos() * xx + theta.sin() * yy
    t = (t - t.amin((1, 2), keepdim=True)) / (t.amax((1, 2), keepdim=True) - t.amin((1, 2), keepdim=True))
    c0, c1 = torch.rand(n, 3, 1, 1, generator=g) * 2 - 1, torch.rand(n, 3, 1, 1, generator=g) * 2 - 1
    return c0 + (c1 - c0) * t[:, None]


def noise_images(n: int, seed: int, size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def sets() -> dict[str, torch.Tensor]:
    return {"smooth": smooth_images(N, seed=1), "noise": noise_images(N, seed=2)}


@pytest.fixture(scope="module")
def results(inception_weights, sets) -> dict[str, dict[str, float]]:
    smooth, noise = sets["smooth"], sets["noise"]
    return {
        "self": inception_metrics(inception_weights, smooth, smooth),
        "different": inception_metrics(inception_weights, noise, smooth, batch_size=4),
        "halves": inception_metrics(inception_weights, smooth[: N // 2], smooth[N // 2:]),
    }


def test_a_set_against_itself(results):
    diff, same = results["different"], results["self"]
    assert abs(same["fid"]) < 1e-6 * diff["fid"] and abs(same["fid"]) < 1e-3
    # The unbiased MMD² of a set against itself is −2/m·(mean self-kernel − mean cross-kernel): ≤ 0, and small next
    # to different sets (it shrinks as 1/m; here m = 10).
    assert -0.1 * diff["kid_mean"] < same["kid_mean"] <= 0
    assert same["kid_std"] == 0.0  # subsets of min(100, 10) = all 10 images: one value


def test_different_sets_are_farther_than_halves_of_one_distribution(results):
    diff, halves = results["different"], results["halves"]
    assert 0 < halves["fid"] < diff["fid"]
    assert halves["kid_mean"] < diff["kid_mean"]
    assert diff["kid_mean"] > 0
    assert set(diff) == {"fid", "kid_mean", "kid_std"} and all(isinstance(v, float) for v in diff.values())


def test_agrees_with_torch_fidelity_features_and_independent_formulas(inception_weights, sets, results):
    """Pool features from torch-fidelity's own FeatureExtractorInceptionV3 (its original forward, uint8 input),
    FID from ldm.evaluation.frechet_distance (eigh form), KID from torch-fidelity's numpy implementation."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.metric_kid import kid_features_to_metric

    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=inception_weights)
    with torch.no_grad():
        f_noise, f_smooth = (net(((sets[k] + 1) * 127.5).round().to(torch.uint8))[0].double()
                             for k in ("noise", "smooth"))
    assert f_noise.shape == (N, 2048) and f_noise.std() > 0.01  # non-degenerate features
    diff = results["different"]
    assert diff["fid"] == pytest.approx(frechet_distance(f_noise, f_smooth), rel=1e-6)  # 70.085 here
    kid = kid_features_to_metric(f_noise, f_smooth, kid_subsets=3, kid_subset_size=N, verbose=False)
    assert diff["kid_mean"] == pytest.approx(kid["kernel_inception_distance_mean"], rel=1e-6)
    assert diff["kid_std"] == 0.0
    kid_self = kid_features_to_metric(f_smooth, f_smooth, kid_subsets=3, kid_subset_size=N, verbose=False)
    assert results["self"]["kid_mean"] == pytest.approx(kid_self["kernel_inception_distance_mean"], rel=1e-6)


@pytest.mark.parametrize("n,m", [(9, 12), (200, 150)])  # fewer samples than dimensions (nuclear norm) and more (eigh)
def test_fid_from_features_matches_reference_formulas(n, m):
    from scipy import linalg
    from torchmetrics.image.fid import _compute_fid

    g = torch.Generator().manual_seed(n)
    d = 16
    a = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    b = torch.randn(m, d, generator=g, dtype=torch.float64) * 1.5 + 0.3
    s1, s2 = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    mu1, mu2 = a.mean(0).numpy(), b.mean(0).numpy()
    scipy_ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    tm_ref = float(_compute_fid(a.mean(0), torch.from_numpy(s1), b.mean(0), torch.from_numpy(s2)))
    ours = fid_from_features(a, b)
    assert ours == pytest.approx(scipy_ref, rel=1e-6)
    assert ours == pytest.approx(tm_ref, rel=1e-6)
    assert ours == pytest.approx(frechet_distance(a, b), rel=1e-6)
    assert abs(fid_from_features(a, a)) < 1e-9 * ours


def test_kid_from_features_subsets():
    from torchmetrics.image.kid import poly_mmd

    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 32, generator=g, dtype=torch.float64)
    b = torch.randn(30, 32, generator=g, dtype=torch.float64) + 0.5
    mean, std = kid_from_features(a, b, subset_size=20, seed=1)
    assert (mean, std) == kid_from_features(a, b, subset_size=20, seed=1)  # seeded: reproducible
    assert std > 0
    full = float(poly_mmd(a[:30], b))  # any 30 of a: the same distribution, so close to the subset average
    assert mean == pytest.approx(full, rel=0.2)
    assert kid_from_features(a[:30], b, subset_size=100) == (pytest.approx(full, rel=1e-12), 0.0)


def test_missing_weights_file(tmp_path, sets):
    missing = tmp_path / "no_such_dir" / WEIGHTS_FILENAME
    with pytest.raises(FileNotFoundError) as e:
        inception_metrics(missing, sets["smooth"], sets["noise"])
    assert str(missing) in str(e.value) and WEIGHTS_FILENAME in str(e.value)


def _executed_when_unpickled() -> None:
    _executed_when_unpickled.ran = True  # type: ignore[attr-defined]


class _Malicious:
    def __reduce__(self):
        return (_executed_when_unpickled, ())


@pytest.mark.parametrize("content", ["wrong_keys", "wrong_shape", "not_a_dict", "garbage_bytes", "pickled_code"])
def test_invalid_weights_file(tmp_path, inception_weights, content):
    path = tmp_path / f"{content}.pth"
    if content == "wrong_keys":
        torch.save({"conv.weight": torch.zeros(3, 3), "fc.weight": torch.zeros(1008, 2048)}, path)
    elif content == "wrong_shape":
        sd = torch.load(inception_weights, weights_only=True)
        sd["fc.weight"] = torch.zeros(1000, 2048)
        torch.save(sd, path)
    elif content == "not_a_dict":
        torch.save([torch.zeros(3)], path)
    elif content == "garbage_bytes":
        path.write_bytes(b"this is not a torch file" * 10)
    else:
        torch.save({"fc.weight": _Malicious()}, path)
    with pytest.raises(ValueError, match=content):
        load_inception(path)
    assert not getattr(_executed_when_unpickled, "ran", False)  # loaded with weights_only=True: never executed


def test_fewer_than_two_images(inception_weights, sets):
    with pytest.raises(ValueError, match="at least 2"):
        inception_metrics(inception_weights, sets["smooth"][:1], sets["noise"])
    with pytest.raises(ValueError, match="at least 2"):
        inception_metrics(inception_weights, sets["smooth"], sets["noise"][:1])


def test_torch_fidelity_missing(monkeypatch, inception_weights, sets):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    with pytest.raises(ModuleNotFoundError, match=r"ldm\[eval\]"):
        inception_metrics(inception_weights, sets["smooth"], sets["noise"])


def test_kid_subsets_match_torch_fidelity_on_the_same_draws():
    """The subset average and population std equal torch-fidelity's mmd2/kernel_poly on the very subsets drawn."""
    from torch_fidelity.metric_kid import kernel_poly, mmd2

    g0 = torch.Generator().manual_seed(3)
    a = torch.randn(40, 32, generator=g0, dtype=torch.float64)
    b = torch.randn(30, 32, generator=g0, dtype=torch.float64) + 0.3
    mean, std = kid_from_features(a, b, subset_size=20, subsets=50, seed=7)
    g, kw, vals = torch.Generator().manual_seed(7), {"kid_kernel_poly_degree": 3, "kid_kernel_poly_gamma": None,
                                                     "kid_kernel_poly_coef0": 1}, []
    for _ in range(50):  # kid_from_features' draw: a permutation of a, then one of b, per subset
        fa, fb = a[torch.randperm(40, generator=g)[:20]].numpy(), b[torch.randperm(30, generator=g)[:20]].numpy()
        vals.append(mmd2(kernel_poly(fa, fa, **kw), kernel_poly(fa, fb, **kw), kernel_poly(fb, fb, **kw)))
    assert mean == pytest.approx(np.mean(vals), rel=1e-9) and std == pytest.approx(np.std(vals), rel=1e-9)
