"""The contrastive image–text loss of CLIP (Radford et al. 2021, Fig. 3), as pure functions (no Lightning).

For N image features I and text features T of matching pairs (row i of each belongs together):

    Î = I / ‖I‖,  T̂ = T / ‖T‖,  s = exp(t) (t learned, clamped to ln 100)
    logits = s · Î T̂ᵀ                                     (N, N)
    L = ½ · (CE(logits, arange N) + CE(logitsᵀ, arange N))

With data parallelism the negatives span the *global* batch: every rank gathers all features with their gradients
(``torch.distributed.nn.functional.all_gather``, whose backward sums the gradients that every rank's loss sends to
each rank's features) and computes the loss over the global N × N logits (open_clip's ``ClipLoss`` with
``gather_with_grad=True``). DDP then averages parameter gradients over ranks, which gives exactly the gradient of the
global loss. ``local_loss=True`` computes only this rank's rows of both logit matrices (B × N instead of N × N, labels
offset by rank); the mean of the ranks' local losses equals the global loss.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MAX_LOGIT_SCALE = math.log(100.0)  # t is clamped to [0, ln 100] (CLIP §2.5; open_clip's training loop)
# CLIP's image normalization (the OpenAI training-set statistics, also used by open_clip's models)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_normalize(images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] (this project's convention) -> CLIP-normalized (x₀₁ − mean) / std."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    mean = images.new_tensor(CLIP_MEAN)[None, :, None, None]
    std = images.new_tensor(CLIP_STD)[None, :, None, None]
    return ((images + 1.0) * 0.5 - mean) / std  # (B, 3, H, W)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, E) of every rank along dim 0 -> (world·B, E), differentiable; identity without
    an initialized process group. Every rank must pass the same B."""
    import torch.distributed as dist  # noqa: PLC0415

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    import torch.distributed.nn.functional as dist_fn  # noqa: PLC0415

    return torch.cat(dist_fn.all_gather(x), dim=0)


def clip_logits(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                all_image_features: torch.Tensor | None = None, all_text_features: torch.Tensor | None = None,
                local_loss: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled cosine-similarity logits (features already unit-normalized; ``logit_scale`` is s = exp(t)).

    Args:
        image_features, text_features: this rank's (B, E).
        all_image_features, all_text_features: the gathered (N, E) global batch, or None on one process.
        local_loss: only this rank's rows, (B, N) each; otherwise the global (N, N) matrix and its transpose.
    Returns:
        logits_per_image (rows: images, columns: texts) and logits_per_text.
    """
    if all_image_features is None or all_text_features is None:
        logits_per_image = logit_scale * image_features @ text_features.T  # (B, B)
        return logits_per_image, logits_per_image.T
    if local_loss:
        return (logit_scale * image_features @ all_text_features.T,  # (B, N)
                logit_scale * text_features @ all_image_features.T)  # (B, N)
    logits_per_image = logit_scale * all_image_features @ all_text_features.T  # (N, N)
    return logits_per_image, logits_per_image.T


def contrastive_labels(logits_per_image: torch.Tensor, rank: int = 0, local_loss: bool = False) -> torch.Tensor:
    """Index of the matching text for every row: arange(rows), offset by rank·B for local rows, (rows,)."""
    rows = logits_per_image.shape[0]
    labels = torch.arange(rows, device=logits_per_image.device, dtype=torch.long)
    return labels + rows * rank if local_loss else labels


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
              rank: int = 0, local_loss: bool = False,
              gather: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The symmetric contrastive loss ½ (CE(logits_i, y) + CE(logits_t, y)) over the global batch.

    Args:
        image_features, text_features: this rank's (B, E) features, unit-normalized.
        logit_scale: s = exp(t), a scalar tensor.
        rank: this process's rank (labels of ``local_loss``).
        local_loss: compute only this rank's rows (see the module docstring).
        gather: gather features from all ranks (a no-op without an initialized process group).
    Returns:
        (loss scalar, logits_per_image, labels) — the last two for metrics such as :func:`top1_accuracy`.
    """
    if image_features.shape != text_features.shape or image_features.ndim != 2:
        raise ValueError(f"image_features {tuple(image_features.shape)} and text_features "
                         f"{tuple(text_features.shape)} must both be (B, E)")
    all_img = gather_with_grad(image_features) if gather else image_features
    all_txt = gather_with_grad(text_features) if gather else text_features
    if all_img is image_features:  # one process
        all_img = all_txt = None
    logits_per_image, logits_per_text = clip_logits(image_features, text_features, logit_scale, all_img, all_txt,
                                                    local_loss)
    labels = contrastive_labels(logits_per_image, rank, local_loss and all_img is not None)
    loss = 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))
    return loss, logits_per_image, labels


def top1_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose largest logit is at ``labels`` (image→text retrieval within the batch), a scalar.

    Only the pair's own column counts, as in the loss: where a caption repeats within the batch, picking the
    identical caption of another pair is a miss. For evaluation, :func:`ldm.evaluation.retrieval_accuracy` ranks the
    distinct captions instead."""
    return (logits.argmax(dim=-1) == labels).float().mean()


@torch.no_grad()
def clamp_logit_scale_(t: torch.nn.Parameter, max_value: float = MAX_LOGIT_SCALE) -> None:
    """Clamp the learned log-temperature t in place to [0, ln 100] (after each optimizer step)."""
    t.clamp_(0.0, max_value)
