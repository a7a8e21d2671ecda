"""Image ⇄ tensor conversion and robust decoding for the sampling pipeline."""
from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

log = logging.getLogger(__name__)


def _as_list(x: Any, n: int) -> list:
    items = list(x) if isinstance(x, (list, tuple)) else [x]
    if len(items) == 1:
        items = items * n
    if len(items) != n:
        raise ValueError(f"expected 1 or {n} images, got {len(items)}")
    return items


def upright(im: Image.Image) -> Image.Image:
    """``im`` as it is displayed: turned by its EXIF orientation tag (a phone's photo is often stored sideways with
    the tag saying so), as image viewers, diffusers' ``load_image`` and the web UIs show it; ``im`` itself when it
    has no such tag."""
    return ImageOps.exif_transpose(im) or im


def open_image(path: str | os.PathLike, name: str = "image") -> Image.Image:
    """The image in file ``path``, decoded now and upright (:func:`upright`); a missing file or one PIL cannot read
    fails here, naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name}: file {os.fspath(path)!r} not found")
    try:
        with Image.open(path) as im:
            im.load()
            return upright(im.copy())
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is OSError
        raise ValueError(f"{name}: {os.fspath(path)!r} is not an image PIL can read ({e})") from None


def _pil_images(x: Any, n: int, name: str) -> list[Image.Image]:
    """PIL images (one or ``n``) from PIL images or image file paths; a TypeError names ``name`` for anything else."""
    out = []
    for item in _as_list(x, n):
        if isinstance(item, (str, os.PathLike)):
            item = open_image(item, name)  # upright already
        elif isinstance(item, Image.Image):
            item = upright(item)
        else:
            raise TypeError(f"{name} must be a PIL image, an image file path (str or os.PathLike), a list of those, "
                            f"or a tensor; got {type(item).__name__}")
        out.append(item)
    return out


def _batch_of(t: torch.Tensor, n: int, channels: int, name: str, layout: str) -> torch.Tensor:
    """``t`` (B, channels, H, W) or (channels, H, W) as a batch of ``n``: B must be 1 or ``n``; otherwise a
    ValueError names ``name`` and the expected ``layout``."""
    t = t[None] if t.dim() == 3 else t
    if t.dim() != 4 or t.shape[1] != channels or t.shape[0] not in (1, n) or min(t.shape[2:]) < 1:
        raise ValueError(f"{name} tensor must be {layout} with B = 1 or {n} (one per prompt), got {tuple(t.shape)}")
    return t.expand(n, -1, -1, -1) if t.shape[0] == 1 else t


def to_image_tensor(image: Any, n: int, height: int, width: int) -> torch.Tensor:
    """PIL image(s), image file path(s) or a (B, 3, H, W) tensor in [-1, 1] -> (n, 3, height, width) float tensor
    in [-1, 1]."""
    if isinstance(image, torch.Tensor):
        t = _batch_of(image, n, 3, "init_image", "(B, 3, H, W) in [-1, 1]")
        return torch.nn.functional.interpolate(t.float(), size=(height, width), mode="bicubic", antialias=True)
    arrs = [np.asarray(im.convert("RGB").resize((width, height), Image.Resampling.LANCZOS), dtype=np.float32)
            for im in _pil_images(image, n, "init_image")]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2) / 127.5 - 1.0


def to_mask_tensor(mask: Any, n: int, height: int, width: int) -> torch.Tensor:
    """PIL mask(s) (white = repaint), image file path(s) or a (B, 1, H, W) tensor -> (n, 1, height, width) in
    {0, 1}."""
    if isinstance(mask, torch.Tensor):
        m = _batch_of(mask, n, 1, "mask", "(B, 1, H, W), 1 = repaint")
        m = torch.nn.functional.interpolate(m.float(), size=(height, width), mode="nearest")
    else:
        arrs = [np.asarray(im.convert("L").resize((width, height), Image.Resampling.NEAREST), dtype=np.float32) / 255.0
                for im in _pil_images(mask, n, "mask")]
        m = torch.from_numpy(np.stack(arrs))[:, None]
    return (m > 0.5).float()


def decode_latents(vae: torch.nn.Module, z: torch.Tensor, tile: int | None = None) -> torch.Tensor:
    """Scaled latents (B, C, h, w) -> images (B, 3, H, W) in [0, 1].

    Runs in the autoencoder's dtype; a fp16 decode that produces NaN/inf is retried in fp32 (the SD VAE is known to
    overflow in fp16), and an out-of-memory decode is retried in tiles. Both are logged.
    """
    dtype = next(vae.parameters()).dtype
    try:
        x = vae.decode_latents(z.to(dtype)) if tile is None else vae.decode_latents_tiled(z.to(dtype), tile)
    except torch.OutOfMemoryError:
        log.warning("autoencoder decode ran out of memory at %s; retrying in tiles", tuple(z.shape))
        return decode_latents(vae, z, tile=32)
    if dtype != torch.float32 and not torch.isfinite(x).all():
        log.warning("autoencoder decode in %s produced NaN/inf; retrying in float32", dtype)
        vae.float()
        try:
            x = vae.decode_latents(z.float())
        finally:
            vae.to(dtype)
    return ((x.float() + 1) / 2).clamp(0, 1)


def images_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> list of RGB PIL images."""
    arr = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def save_png(image: Image.Image, path: str | os.PathLike, **options: Any) -> None:
    """Write ``image`` as a PNG at ``path`` atomically (a temporary file beside it, renamed into place): a crash or
    a full disk leaves the earlier file or none, never a truncated image. ``options``: PIL's (``pnginfo`` …)."""
    from ldm.checkpoint import atomic_write  # noqa: PLC0415

    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", **options))
