#!/usr/bin/env python
"""Encode a dataset once with a model's frozen autoencoder (and optionally its text encoder) into latent shards.

    python scripts/cache_latents.py --model runs/unet/model.safetensors --data data/emoji64 --out data/emoji64-latents \
        [--split train] [--context] [--batch-size 64]
    python scripts/train.py --config configs/emoji/unet.yaml data.train=data/emoji64-latents ...

U-Net training then skips the encoders (published systems gain about 1.4×). Latents are stored unscaled (posterior
samples, float16); the diffusion stage applies the model's scale/shift, so a re-measured scale needs no re-encoding.
With ``--context`` the text encoder's token states are cached too; caption dropout then replaces dropped rows with
the empty-prompt embedding.
"""
from __future__ import annotations

import argparse
import logging
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    from pathlib import Path

    import ldm
    from ldm.data import FolderDataset, ShardDataset, collate, write_latent_cache
    from ldm.data.distributed import batches_by_shape
    from ldm.data.transforms import BUCKET_MAX_RATIO, BUCKET_STEP, RESIZE_POLICIES, ImageTransform

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a model whose autoencoder (and text encoder) to use")
    p.add_argument("--config", default=None)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--size", type=int, default=None, help="image size (default: the model's); with --resize bucket "
                   "the side of the square bucket")
    p.add_argument("--resize", choices=RESIZE_POLICIES, default="center-crop",
                   help="bucket: each image to its nearest aspect-ratio bucket (train with the same data.resize)")
    p.add_argument("--bucket-step", type=int, default=BUCKET_STEP, help="bucket sides' multiple, pixels")
    p.add_argument("--bucket-max-ratio", type=float, default=BUCKET_MAX_RATIO, help="largest bucket aspect ratio")
    p.add_argument("--context", action="store_true", help="also cache the text encoder's token states")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    try:
        ImageTransform(a.size or 8, a.resize, bucket_step=a.bucket_step, bucket_max_ratio=a.bucket_max_ratio)
    except ValueError as e:
        p.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = ldm.load(a.model, a.config, device=dev)
    vae = model.vae
    size = a.size or int(model.config.model.params.image_size) * vae.downsample_factor
    # every kept sample once, batched by shape (buckets), the last batch of each shape partial (the training
    # loader's equal-batch rule would drop the remainder); skipped samples are counted and reported by the dataset
    root = Path(a.data)
    is_folder = root.is_dir() and not (root / "manifest.json").exists() and not any(root.glob("*.tar"))
    opts = dict(size=size, resize=a.resize, bucket_step=a.bucket_step, bucket_max_ratio=a.bucket_max_ratio)
    ds = FolderDataset(root, **opts) if is_folder else ShardDataset(a.data, split=a.split, **opts)
    loader = (collate(b) for b in batches_by_shape(iter(ds), a.batch_size, partial=True))
    gen = torch.Generator(device=dev).manual_seed(a.seed)
    encode = lambda x: vae.encode(x.to(dev, model.dtype)).sample(generator=gen)  # noqa: E731 (raw, unscaled)
    text = (lambda caps: model.encode_text(caps)) if a.context else None  # noqa: E731
    write_latent_cache(loader, encode, a.out, text_fn=text, split=a.split,
                       extra={"model": str(a.model), "scale_factor": float(vae.scale_factor),
                              "shift_factor": float(vae.shift_factor)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
