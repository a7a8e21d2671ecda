"""FID and KID from a local Inception-v3 weights file, with no downloads.

The network is the standard FID Inception-v3 (the TensorFlow 2015-12-05 graph converted to PyTorch) as implemented by
torch-fidelity's ``FeatureExtractorInceptionV3`` through torchmetrics' ``NoTrainInceptionV3`` wrapper; the weights are
the file ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid's release; torch-fidelity publishes the same state dict
as ``weights-inception-2015-12-05-6726825d.pth``). It has to be fetched once on a machine with internet and its path
passed here: nothing in this module downloads anything.

Choices, all matching torch-fidelity (and so the published TensorFlow FID numbers):

* images in [-1, 1] are mapped to [0, 255] and rounded to uint8 (what saving them as PNG does), then resized to
  299×299 with torch-fidelity's TensorFlow-1.x-compatible bilinear resize (torchmetrics' ``antialias=False``);
* features are the 2048-d pool features; each image set goes through the network once and both FID and KID are
  derived from those features;
* FID = ‖μ_a − μ_b‖² + Tr Σ_a + Tr Σ_b − 2 Tr (Σ_a Σ_b)^½ in float64. Tr (Σ_a Σ_b)^½ is computed exactly as the
  nuclear norm of A Bᵀ / √((n−1)(m−1)) (A, B the centred features) when a set has fewer images than feature
  dimensions, and as Tr (Σ_a^½ Σ_b Σ_a^½)^½ from symmetric eigendecompositions otherwise; both are the same
  quantity as the usual eigenvalue / sqrtm form, without its non-symmetric 2048×2048 eigenproblem;
* KID is torchmetrics' ``poly_mmd`` (unbiased MMD² with the cubic polynomial kernel, as in torch-fidelity and
  Bińkowski et al. 2018), averaged over 100 random subsets of min(kid_subset, N) images, std over subsets.

The weights are read with ``torch.load(..., weights_only=True)``; torch-fidelity itself would unpickle the file with
``weights_only=False``, so it is only ever handed a re-serialized copy of the validated tensors.
"""
from __future__ import annotations

import importlib
import io
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ldm.evaluation import check_finite, frechet_distance

log = logging.getLogger(__name__)

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
PYTORCH_FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
TORCH_FIDELITY_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
FEATURE_DIM = 2048
KID_SUBSETS = 100
_INSTALL_HINT = "pip install 'ldm[eval]' (or: pip install torch-fidelity==0.4.0)"


def _require_torch_fidelity() -> None:
    try:
        importlib.import_module("torch_fidelity")
        importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    except ImportError as e:
        raise ModuleNotFoundError(
            f"FID/KID need torch-fidelity's Inception-v3 implementation, which is not installed: {_INSTALL_HINT}"
        ) from e


def _check_images(name: str, images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, 3, H, W), got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} must have shape (N, 3, H, W) (RGB), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be float images in [-1, 1], got dtype {images.dtype}")
    if images.shape[0] < 2:
        raise ValueError(f"FID/KID need at least 2 images per set, {name} has {images.shape[0]}")
    check_finite(name, images)


def load_inception(weights: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The FID Inception-v3 (torchmetrics' ``NoTrainInceptionV3`` = torch-fidelity's ``FeatureExtractorInceptionV3``,
    TF-1.x-compatible resize) with the state dict in ``weights``, in eval mode on ``device``.

    Its forward takes uint8 images (B, 3, H, W) in [0, 255] and returns the (B, 2048) pool features.

    Raises:
        ModuleNotFoundError: torch-fidelity is not installed.
        FileNotFoundError: ``weights`` does not exist.
        ValueError: ``weights`` is not a (safely loadable) Inception-v3 FID state dict.
    """
    _require_torch_fidelity()
    from torchmetrics.image.fid import NoTrainInceptionV3

    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception-v3 weights not found: {path}. FID/KID need the standard FID Inception weights "
            f"{WEIGHTS_FILENAME} (pytorch-fid's release {PYTORCH_FID_WEIGHTS_URL}; torch-fidelity publishes the same "
            f"state dict as {TORCH_FIDELITY_WEIGHTS_URL}). Download it on a machine with internet and pass its path; "
            "nothing here downloads it."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors, or a pickle that needs more than tensors (refused by weights_only)
        raise ValueError(
            f"{path} is not an Inception-v3 state dict that loads safely (torch.load weights_only=True failed: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    if not (isinstance(state, Mapping) and state
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())):
        raise ValueError(f"{path} does not hold a state dict (a mapping of parameter names to tensors), "
                         f"but a {type(state).__name__}; expected the Inception-v3 FID weights {WEIGHTS_FILENAME}")
    # torch-fidelity unpickles the file it is given with weights_only=False: give it only our validated tensors.
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    del state
    try:
        model = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(FEATURE_DIM)],
                                   feature_extractor_weights_path=buf,  # type: ignore[arg-type]  # torch.load takes a file
                                   antialias=False)
    except RuntimeError as e:  # load_state_dict(strict=True): missing/unexpected keys or wrong shapes
        msg = " ".join(str(e).split())
        raise ValueError(
            f"{path} is not an Inception-v3 FID state dict (torch-fidelity's FeatureExtractorInceptionV3 keys "
            f"Conv2d_1a_3x3.conv.weight … Mixed_7c.*, fc.weight of shape (1008, 2048)): "
            f"{msg[:400]}{'…' if len(msg) > 400 else ''}"
        ) from e
    log.info("loaded Inception-v3 FID weights from %s", path)
    return model.to(device).eval()


def inception_features(model: torch.nn.Module, images: torch.Tensor, *, batch_size: int = 64) -> torch.Tensor:
    """(N, 2048) float32 CPU pool features of images (N, 3, H, W) in [-1, 1] (clamped, then rounded to uint8)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    check_finite("images", images)  # NaN would silently become black pixels (uint8 0) and a finite, wrong FID
    lo, hi = float(images.min()), float(images.max())
    if lo < -1.001 or hi > 1.001:
        log.warning("images span [%.3g, %.3g], expected [-1, 1]: clamping", lo, hi)
    out = []
    with torch.inference_mode():
        for chunk in images.split(batch_size):
            x = ((chunk.to(device=device, dtype=torch.float32).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            out.append(model(x).float().cpu())
    return torch.cat(out)


# The Fréchet distance of Inception features: the project's one implementation (exact, fast for N < D too).
fid_from_features = frechet_distance


def kid_from_features(a: torch.Tensor, b: torch.Tensor, *, subset_size: int = 1000, subsets: int = KID_SUBSETS,
                      seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (mean, std) of features a (N, D) and b (M, D): torchmetrics' ``poly_mmd`` (unbiased
    MMD², kernel (xᵀy/D + 1)³) over ``subsets`` random subsets of min(subset_size, N, M) rows of each, in float64,
    drawn from a generator seeded with ``seed``; std is the population std over subsets (as torch-fidelity).

    Like every unbiased MMD² estimate, the KID of a set against itself is not exactly 0 but slightly negative
    (−2/m · (mean self-kernel − mean cross-kernel)); it is ~0 relative to the KID of genuinely different sets.
    """
    from torchmetrics.image.kid import poly_mmd

    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D), got {tuple(a.shape)} and {tuple(b.shape)}")
    n, m = a.shape[0], b.shape[0]
    size = min(subset_size, n, m)
    if size < 2:
        raise ValueError(f"KID needs subsets of at least 2 samples, got min(subset_size={subset_size}, {n}, {m})")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    check_finite("a", a)
    check_finite("b", b)
    a, b = a.double(), b.double()
    if size == n == m:  # every subset is the whole set: the estimate does not depend on the draw
        return float(poly_mmd(a, b)), 0.0
    g = torch.Generator().manual_seed(seed)
    vals = torch.stack([
        poly_mmd(a[torch.randperm(n, generator=g)[:size].to(a.device)],
                 b[torch.randperm(m, generator=g)[:size].to(b.device)])
        for _ in range(subsets)
    ])
    return float(vals.mean()), float(vals.std(unbiased=False))


def inception_metrics(weights: str | os.PathLike, real: torch.Tensor, fake: torch.Tensor, *, kid_subset: int = 100,
                      device: str | torch.device = "cpu", batch_size: int = 64) -> dict[str, float]:
    """FID and KID between two image sets with the FID Inception-v3 loaded from the local file ``weights``.

    Args:
        weights: path to the Inception-v3 FID state dict ``pt_inception-2015-12-05-6726825d.pth``.
        real, fake: (N, 3, H, W) float images in [-1, 1] (any size: the network resizes to 299), N >= 2 each.
        kid_subset: KID subset size; min(kid_subset, N_real, N_fake) is used, over 100 subsets.
        device: where the network runs.
        batch_size: images per forward pass.

    Returns:
        {"fid": ..., "kid_mean": ..., "kid_std": ...}. Each set goes through the network once (``fake is real`` only
        once in all).

    Raises:
        ValueError: fewer than 2 images in a set, wrong shape, or ``weights`` is not an Inception-v3 state dict.
        FileNotFoundError: ``weights`` does not exist (the message says where the file comes from).
        ModuleNotFoundError: torch-fidelity is not installed (``pip install 'ldm[eval]'``).
    """
    _check_images("real", real)
    _check_images("fake", fake)
    if kid_subset < 2:
        raise ValueError(f"kid_subset must be >= 2, got {kid_subset}")
    model = load_inception(weights, device)
    f_real = inception_features(model, real, batch_size=batch_size)
    f_fake = f_real if fake is real else inception_features(model, fake, batch_size=batch_size)
    del model
    fid = fid_from_features(f_real, f_fake)
    kid_mean, kid_std = kid_from_features(f_real, f_fake, subset_size=kid_subset)
    log.info("FID %.4f, KID %.6f ± %.6f (%d real, %d fake images, KID subsets of %d)", fid, kid_mean, kid_std,
             len(f_real), len(f_fake), min(kid_subset, len(f_real), len(f_fake)))
    return {"fid": fid, "kid_mean": kid_mean, "kid_std": kid_std}
