"""Image transforms on PIL images: resize (shorter side), center crop, pad to square, random flip, → [-1, 1].

Random flips are off by default: emoji and any image with text or handedness (a pointing hand, a clock) change
meaning when mirrored, so flipping is the user's decision (``flip=True``).
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image

RESIZE_POLICIES = ("center-crop", "pad", "none")


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


def fit(im: Image.Image, size: int | None, policy: str = "center-crop") -> Image.Image:
    """Bring an image to ``size``×``size``: ``center-crop`` (shorter side → size, crop), ``pad`` (longer side →
    size, pad white) or ``none`` (leave as is; batching then needs equal sizes)."""
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"resize policy must be one of {RESIZE_POLICIES}, got {policy!r}")
    if policy == "none" or size is None:
        return im
    if policy == "pad":
        return pad_to_square(resize_longer(im, size))
    return center_crop(resize_shorter(im, size), size)


class ImageTransform:
    """PIL RGB image → (3, size, size) tensor in [-1, 1], with an optional horizontal flip (p = 0.5)."""

    def __init__(self, size: int | None, resize: str = "center-crop", flip: bool = False):
        if resize not in RESIZE_POLICIES:
            raise ValueError(f"resize must be one of {RESIZE_POLICIES}, got {resize!r}")
        self.size, self.resize, self.flip = size, resize, flip

    def __call__(self, im: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        im = fit(im, self.size, self.resize)
        if self.flip and (rng or random).random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor(im)  # (3, size, size)

    def __repr__(self) -> str:
        return f"ImageTransform(size={self.size}, resize={self.resize!r}, flip={self.flip})"


def aspect_buckets(base: int, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(w, h) buckets with about ``base``² pixels, sides multiples of ``step``, aspect ≤ ``max_ratio``
    (NovelAI's aspect-ratio bucketing)."""
    out = set()
    w = step
    while w <= base * max_ratio:
        h = (base * base // w) // step * step
        if h >= step and max(w / h, h / w) <= max_ratio:
            out.add((w, h))
        w += step
    return sorted(out)


def nearest_bucket(w: int, h: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose log aspect ratio is closest to the image's."""
    r = np.log(w / h)
    return min(buckets, key=lambda b: abs(np.log(b[0] / b[1]) - r))


def fit_bucket(im: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Resize to cover the bucket, then center-crop to exactly (w, h)."""
    bw, bh = bucket
    s = max(bw / im.width, bh / im.height)
    im = im.resize((max(bw, round(im.width * s)), max(bh, round(im.height * s))), Image.BICUBIC)
    left, top = (im.width - bw) // 2, (im.height - bh) // 2
    return im.crop((left, top, left + bw, top + bh))
