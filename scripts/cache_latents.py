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
from pathlib import Path

import torch


log = logging.getLogger("cache_latents")


def main(argv: list[str] | None = None) -> int:
    from ldm.checkpoint import CheckpointError
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
    check_args(p, a)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(a)
    except (ValueError, OSError, NotImplementedError, CheckpointError) as e:
        log.error("%s", str(e).strip().replace("\n", " "))
        return 2


def check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Bad arguments fail before the model loads, each naming its argument (argparse's one-line error, status 2)."""
    from ldm.cli.sample import check_device, check_model_kind, describe_target, model_target
    from ldm.config import load_config
    from ldm.data.shards import has_manifest, read_manifest
    from ldm.data.tario import expand_shards

    if not Path(a.model).exists():
        p.error(f"--model: {a.model} not found")
    if a.config and not Path(a.config).is_file():
        p.error(f"--config: {a.config} not found")
    if a.batch_size <= 0:
        p.error(f"--batch-size {a.batch_size}: must be positive")
    if a.size is not None and a.size <= 0:
        p.error(f"--size {a.size}: must be positive")
    if not a.split or "/" in a.split or "\\" in a.split:
        p.error(f"--split {a.split!r}: expected a plain name (it prefixes the shard files)")
    if Path(a.out).exists() and not Path(a.out).is_dir():
        p.error(f"--out: {a.out} exists and is not a folder")
    root = Path(a.data)
    if has_manifest(root):
        try:
            have = sorted(read_manifest(root).get("splits", {}))
        except (OSError, ValueError) as e:
            p.error(f"--data: {root / 'manifest.json'}: {e}")
        if a.split not in have:
            p.error(f"--split {a.split}: not a split of {root / 'manifest.json'} (has {', '.join(have) or 'none'})")
    elif not root.is_dir():  # a shard file, a brace pattern or ::-joined patterns
        try:
            missing = [u for u in expand_shards(a.data) if not Path(u).is_file()]
        except ValueError as e:
            p.error(f"--data: {e}")
        if missing:
            p.error(f"--data: {missing[0]} not found" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    try:
        a.device = check_device(a.device)
        if a.config:
            target = model_target(load_config(a.config))
            if target not in (None, "LatentDiffusion"):
                raise ValueError(f"--config {a.config}: describes {describe_target(target)}, not a text-to-image "
                                 "model (whose autoencoder and text encoder are used)")
        check_model_kind(a.model, "--model", what="a text-to-image model (whose autoencoder and text encoder are "
                             "used; configs/*/unet.yaml exports)")
    except ValueError as e:
        p.error(str(e))


def run(a: argparse.Namespace) -> int:
    import ldm
    from ldm.data import FolderDataset, ShardDataset, collate, write_latent_cache
    from ldm.data.distributed import batches_by_shape

    dev = a.device
    model = ldm.load(a.model, a.config, device=dev)
    if not hasattr(model, "vae"):
        raise ValueError(f"--model {a.model}: holds a {type(model).__name__}, not a text-to-image model")
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
