"""Image transforms on PIL images: resize (shorter side), center crop, pad to square, aspect-ratio buckets, random
flip, → [-1, 1].

Random flips are off by default: emoji and any image with text or handedness (a pointing hand, a clock) change
meaning when mirrored, so flipping is the user's decision (``flip=True``).
"""

from __future__ import annotations

import functools
import math
import random

import numpy as np
import torch
from PIL import Image

RESIZE_POLICIES = ("center-crop", "pad", "none", "bucket")
BUCKET_STEP, BUCKET_MAX_RATIO = 64, 2.0  # bucket sides: multiples of 64 px (8 latents); aspect ≤ 2:1


def resize_shorter(im: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` (aspect kept). Bicubic up, box-filtered (area) down."""
    w, h = im.size
    if min(w, h) == size:
        return im
    s = size / min(w, h)
    new = (max(size, round(w * s)), max(size, round(h * s)))
    return im.resize(new, Image.BICUBIC if s > 1 else Image.BOX)


def resize_longer(im: Image.Image, size: int) -> Image.Image:
    """Resize so the longer side is ``size`` (aspect kept)."""
    w, h = im.size
    s = size / max(w, h)
    new = (max(1, round(w * s)), max(1, round(h * s)))
    return im if new == im.size else im.resize(new, Image.BICUBIC if s > 1 else Image.BOX)


def center_crop(im: Image.Image, size: int) -> Image.Image:
    """Crop the central ``size``×``size`` square (the image must be at least that large)."""
    w, h = im.size
    if w == h == size:
        return im
    if w < size or h < size:
        raise ValueError(f"center_crop: image {w}x{h} is smaller than size={size}")
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))  # torchvision's offsets
    return im.crop((left, top, left + size, top + size))


def pad_to_square(im: Image.Image, fill: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Pad the shorter side symmetrically with ``fill`` (white by default) to a square."""
    w, h = im.size
    if w == h:
        return im
    side = max(w, h)
    out = Image.new("RGB", (side, side), fill)
    out.paste(im.convert("RGB"), ((side - w) // 2, (side - h) // 2))
    return out


def to_tensor(im: Image.Image) -> torch.Tensor:
    """RGB PIL image → float32 tensor (3, H, W) in [-1, 1]."""
    arr = np.asarray(im if im.mode == "RGB" else im.convert("RGB"), dtype=np.float32)  # (H, W, 3) in [0, 255]
    return torch.from_numpy(arr).permute(2, 0, 1).div(127.5).sub(1.0).contiguous()  # (3, H, W)


def to_pil(x: torch.Tensor) -> Image.Image:
    """Inverse of :func:`to_tensor`: (3, H, W) in [-1, 1] → RGB PIL image."""
    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).numpy(), "RGB")


def fit(im: Image.Image, size: int | None, policy: str = "center-crop", *, bucket_step: int = BUCKET_STEP,
        bucket_max_ratio: float = BUCKET_MAX_RATIO) -> Image.Image:
    """Bring an image to ``size``×``size``: ``center-crop`` (shorter side → size, crop), ``pad`` (longer side →
    size, pad white), ``bucket`` (to the :func:`aspect_buckets` shape of about size² pixels nearest its aspect ratio)
    or ``none`` (leave as is; the loader then batches equal sizes together)."""
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"resize policy must be one of {RESIZE_POLICIES}, got {policy!r}")
    if policy == "none" or size is None:
        return im
    if policy == "pad":
        return pad_to_square(resize_longer(im, size))
    if policy == "bucket":
        return fit_bucket(im, nearest_bucket(im.width, im.height, aspect_buckets(size, bucket_step, bucket_max_ratio)))
    return center_crop(resize_shorter(im, size), size)


class ImageTransform:
    """PIL RGB image → (3, H, W) tensor in [-1, 1] (H = W = ``size`` except with ``resize="bucket"`` or
    ``"none"``), with an optional horizontal flip (p = 0.5)."""

    def __init__(self, size: int | None, resize: str = "center-crop", flip: bool = False, *,
                 bucket_step: int = BUCKET_STEP, bucket_max_ratio: float = BUCKET_MAX_RATIO):
        if resize not in RESIZE_POLICIES:
            raise ValueError(f"resize must be one of {RESIZE_POLICIES}, got {resize!r}")
        if resize == "bucket":
            if size is None:
                raise ValueError("resize='bucket' needs size (the side of the square bucket; the others keep its area)")
            aspect_buckets(size, bucket_step, bucket_max_ratio)  # validates the bucket arguments early
        self.size, self.resize, self.flip = size, resize, flip
        self.bucket_step, self.bucket_max_ratio = bucket_step, bucket_max_ratio

    def __call__(self, im: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        im = fit(im, self.size, self.resize, bucket_step=self.bucket_step, bucket_max_ratio=self.bucket_max_ratio)
        if self.flip and (rng or random).random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor(im)  # (3, H, W)

    def __repr__(self) -> str:
        extra = (f", bucket_step={self.bucket_step}, bucket_max_ratio={self.bucket_max_ratio}"
                 if self.resize == "bucket" else "")
        return f"ImageTransform(size={self.size}, resize={self.resize!r}, flip={self.flip}{extra})"


@functools.lru_cache(maxsize=64, typed=True)  # typed: 512.0 is refused, not served 512's set
def aspect_buckets(base: int, step: int = BUCKET_STEP,
                   max_ratio: float = BUCKET_MAX_RATIO) -> tuple[tuple[int, int], ...]:
    """Aspect-ratio buckets (NovelAI's, as kohya-ss trains SD with): for each short side ``w`` (a multiple of
    ``step`` from about ``base/√max_ratio`` up to ``base``) the long side ``h``, the largest multiple of ``step`` with
    w·h ≤ base² and h/w ≤ ``max_ratio``; both orientations, sorted. Square ``base``×``base`` is one of them when
    ``step`` divides ``base``; no bucket has more than base² pixels, and no short side is below base/√max_ratio
    rounded down to ``step``.

    ``base=512``: (320, 640), (384, 640), (448, 576), (512, 512), (576, 448), (640, 384), (640, 320)."""
    if not isinstance(base, int) or not isinstance(step, int) or base <= 0 or step <= 0:
        raise ValueError(f"aspect buckets need positive int base and step, got base={base!r}, step={step!r}")
    if step > base:
        raise ValueError(f"bucket step {step} is larger than the bucket side {base}")
    if not math.isfinite(max_ratio) or max_ratio < 1:
        raise ValueError(f"bucket max_ratio must be a finite number ≥ 1, got {max_ratio!r}")
    out = set()
    shortest = max(step, int(base / math.sqrt(max_ratio)) // step * step)
    for w in range(shortest, base + 1, step):
        h = min(base * base // w // step * step, int(w * max_ratio) // step * step)  # the long side
        if h >= w:
            out.update({(w, h), (h, w)})
    return tuple(sorted(out))


def nearest_bucket(w: int, h: int, buckets: tuple[tuple[int, int], ...] | list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose log aspect ratio is closest to the image's (ties: the first in ``buckets``' order)."""
    r = math.log(w / h)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - r))


def fit_bucket(im: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Resize (aspect kept) to cover the (w, h) bucket, then center-crop to exactly (w, h): bicubic up,
    box-filtered (area) down, as :func:`resize_shorter`."""
    bw, bh = bucket
    if im.size == (bw, bh):
        return im
    s = max(bw / im.width, bh / im.height)
    new = (max(bw, round(im.width * s)), max(bh, round(im.height * s)))
    if new != im.size:
        im = im.resize(new, Image.BICUBIC if s > 1 else Image.BOX)
    left, top = int(round((im.width - bw) / 2.0)), int(round((im.height - bh) / 2.0))  # torchvision's offsets
    return im.crop((left, top, left + bw, top + bh))
