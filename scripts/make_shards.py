#!/usr/bin/env python
"""Convert an image folder with captions into webdataset shards.

    python scripts/make_shards.py SRC_FOLDER OUT_DIR --size 256 --resize center-crop|pad|bucket|none
        [--max-count 1000] [--max-size 1000000000] [--split train] [--format png|jpg|webp]

SRC_FOLDER holds images with a ``.txt`` caption beside each, or a ``metadata.jsonl`` (``file_name``, ``text``).
Bad inputs are skipped and counted exactly as the readers do (see ldm/data/validate.py); the counts are printed and
stored in ``OUT_DIR/manifest.json`` with the shard list, so ``make_dataloader(OUT_DIR)`` reads it directly.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import time
from pathlib import Path

from ldm.data.folder import FolderSource
from ldm.data.shards import SampleDecoder
from ldm.data.tario import ShardWriter, shard_pattern
from ldm.data.transforms import BUCKET_MAX_RATIO, BUCKET_STEP, RESIZE_POLICIES, ImageTransform, fit
from ldm.data.validate import SkipStats


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="image folder (captions in .txt files or metadata.jsonl)")
    p.add_argument("out", help="output directory")
    p.add_argument("--size", type=int, default=None, help="output side in pixels (needed unless --resize none)")
    p.add_argument("--resize", choices=RESIZE_POLICIES, default="center-crop",
                   help="bucket: each image to its nearest aspect-ratio bucket of about size² pixels")
    p.add_argument("--bucket-step", type=int, default=BUCKET_STEP, help="bucket sides' multiple, pixels")
    p.add_argument("--bucket-max-ratio", type=float, default=BUCKET_MAX_RATIO, help="largest bucket aspect ratio")
    p.add_argument("--max-count", type=int, default=1000, help="samples per shard at most")
    p.add_argument("--max-size", type=int, default=10 ** 9, help="bytes per shard at most")
    p.add_argument("--split", default="train", help="split name: shards are OUT/<split>-NNNNNN.tar")
    p.add_argument("--format", choices=["png", "jpg", "webp"], default="png", help="image encoding in the shards")
    p.add_argument("--quality", type=int, default=95, help="jpg/webp quality")
    p.add_argument("--caption-policy", choices=["skip", "empty"], default="skip",
                   help="missing or empty caption: skip the image, or keep it with an empty caption")
    p.add_argument("--min-size", type=int, default=8, help="skip images whose shorter side is below this")
    args = p.parse_args(argv)
    if args.resize != "none" and args.size is None:
        p.error("--size is required unless --resize none")
    try:
        ImageTransform(args.size, args.resize, bucket_step=args.bucket_step, bucket_max_ratio=args.bucket_max_ratio)
    except ValueError as e:
        p.error(str(e))
    return args


def encode(im, fmt: str, quality: int) -> bytes:
    """PIL image → encoded bytes."""
    buf = io.BytesIO()
    im.save(buf, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt],
            **({} if fmt == "png" else {"quality": quality}))
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    buckets = dict(bucket_step=args.bucket_step, bucket_max_ratio=args.bucket_max_ratio)
    decoder = SampleDecoder(lambda im, rng: fit(im, args.size, args.resize, **buckets), args.caption_policy,
                            args.min_size)
    source = FolderSource(args.src, decoder)
    stats = SkipStats()
    out = Path(args.out)
    for old in out.glob(f"{args.split}-*.tar"):  # a previous run's shards would be picked up by directory readers
        old.unlink()
    with ShardWriter(shard_pattern(out, args.split), max_count=args.max_count, max_size=args.max_size) as w:
        for unit in source.units:
            for s in source.iter_unit(unit, stats):
                w.write({"__key__": s["key"].replace(".", "_"), args.format: encode(s["image"], args.format,
                                                                                    args.quality),
                         "txt": s["caption"]})
    manifest = {"format": "ldm-shards/1", "kind": "images", "source": str(Path(args.src).resolve()),
                "size": args.size, "resize": args.resize, **(buckets if args.resize == "bucket" else {}),
                "stats": stats.as_dict(),
                "splits": {args.split: {"shards": [Path(p).name for p in w.shards], "count": sum(w.counts)}}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    stats.report(f"make_shards {args.src}")
    print(f"{sum(w.counts)} samples in {len(w.shards)} shards under {out} ({time.perf_counter() - t0:.1f} s); "
          f"skipped {dict(stats.skipped)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
