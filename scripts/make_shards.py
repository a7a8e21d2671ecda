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
import shutil
import sys
import time
from pathlib import Path

from ldm.checkpoint import atomic_write
from ldm.cli.paths import folder_problem
from ldm.data.folder import FolderSource
from ldm.data.shards import SampleDecoder, existing_manifest
from ldm.data.tario import ShardWriter, move_split_shards, shard_key, shard_pattern
from ldm.data.transforms import BUCKET_MAX_RATIO, BUCKET_STEP, RESIZE_POLICIES, ImageTransform, fit
from ldm.data.validate import SkipStats


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int ≥ {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an int ≥ {lo}, got {v}")
        return v
    return parse


def _quality(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int in 1..100, got {text!r}") from None
    if not 1 <= v <= 100:
        raise argparse.ArgumentTypeError(f"expected an int in 1..100, got {v}")
    return v


#: manifest fields that every split of one output directory must share (the readers treat the splits alike)
SHARED_FIELDS = ("format", "kind", "size", "resize", "bucket_step", "bucket_max_ratio")


def merge_manifest(out: Path, new: dict, split: str) -> dict:
    """``new`` (one split) merged into ``out/manifest.json`` when that exists: the other splits are kept, the top
    level ``stats`` is the sum over the splits. A differing shared field (kind, size, resize, …) raises ValueError
    naming it."""
    old = existing_manifest(out, new, SHARED_FIELDS)
    if old is None:
        return new
    splits = {**old["splits"], split: new["splits"][split]}
    total = SkipStats()
    for entry in splits.values():
        st = entry.get("stats") or {}
        total.kept += int(st.get("kept", 0))
        total.skipped.update(st.get("skipped", {}))
        total.converted.update(st.get("converted", {}))
    return {**old, **new, "splits": splits, "stats": total.as_dict()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="image folder (captions in .txt files or metadata.jsonl)")
    p.add_argument("out", help="output directory")
    p.add_argument("--size", type=_int_at_least(1), default=None,
                   help="output side in pixels (needed unless --resize none)")
    p.add_argument("--resize", choices=RESIZE_POLICIES, default="center-crop",
                   help="bucket: each image to its nearest aspect-ratio bucket of about size² pixels")
    p.add_argument("--bucket-step", type=int, default=BUCKET_STEP, help="bucket sides' multiple, pixels")
    p.add_argument("--bucket-max-ratio", type=float, default=BUCKET_MAX_RATIO, help="largest bucket aspect ratio")
    p.add_argument("--max-count", type=_int_at_least(1), default=1000, help="samples per shard at most")
    p.add_argument("--max-size", type=_int_at_least(1), default=10 ** 9, help="bytes per shard at most")
    p.add_argument("--split", default="train", help="split name: shards are OUT/<split>-NNNNNN.tar")
    p.add_argument("--format", choices=["png", "jpg", "webp"], default="png", help="image encoding in the shards")
    p.add_argument("--quality", type=_quality, default=95, help="jpg/webp quality, 1..100")
    p.add_argument("--caption-policy", choices=["skip", "empty"], default="skip",
                   help="missing or empty caption: skip the image, or keep it with an empty caption")
    p.add_argument("--min-size", type=_int_at_least(0), default=8, help="skip images whose shorter side is below this")
    args = p.parse_args(argv)
    if not Path(args.src).is_dir():
        p.error(f"source folder {args.src!r} " + ("is not a folder" if Path(args.src).exists() else "not found"))
    if problem := folder_problem(args.out):
        p.error(f"output directory {args.out!r}: {problem}")
    if not args.split or "/" in args.split or "\\" in args.split:
        p.error(f"--split: expected a plain name (it prefixes the shard files), got {args.split!r}")
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


def write_shards(args: argparse.Namespace, source: FolderSource, stats: SkipStats, tmp: Path) -> ShardWriter:
    """Every kept sample of ``source`` into shards under ``tmp``; a failure (an unreadable file, Ctrl-C) deletes
    ``tmp`` before it propagates, so no half-written split is left behind."""
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    used: set[str] = set()
    try:
        with ShardWriter(shard_pattern(tmp, args.split), max_count=args.max_count, max_size=args.max_size) as w:
            for unit in source.units:
                for s in source.iter_unit(unit, stats):
                    w.write({"__key__": shard_key(s["key"], used),
                             args.format: encode(s["image"], args.format, args.quality), "txt": s["caption"]})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return w


def write_manifest(out: Path, manifest: dict) -> None:
    """``out/manifest.json`` written aside and renamed: an interrupted write leaves the previous one whole."""
    text = json.dumps(manifest, indent=1)
    atomic_write(out / "manifest.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def build(args: argparse.Namespace) -> int:
    """The split ``args.split`` of ``args.out`` from the folder ``args.src``; 1 when no sample was kept."""
    t0 = time.perf_counter()
    buckets = dict(bucket_step=args.bucket_step, bucket_max_ratio=args.bucket_max_ratio)
    decoder = SampleDecoder(lambda im, rng: fit(im, args.size, args.resize, **buckets), args.caption_policy,
                            args.min_size)
    source = FolderSource(args.src, decoder)
    stats = SkipStats()
    out = Path(args.out)
    head = {"format": "ldm-shards/1", "kind": "images", "source": str(Path(args.src).resolve()),
            "size": args.size, "resize": args.resize, **(buckets if args.resize == "bucket" else {})}
    # an existing manifest that does not match is refused (ValueError) before anything is written
    merge_manifest(out, {**head, "splits": {args.split: {}}}, args.split)
    tmp = out / f".{args.split}-new"  # written aside, so a failed run leaves the previous shards of the split alone
    w = write_shards(args, source, stats, tmp)
    stats.report(f"make_shards {args.src}")
    if sum(w.counts) == 0:
        shutil.rmtree(tmp)
        print(f"make_shards.py: error: no sample of {args.src} was kept (skipped {dict(sorted(stats.skipped.items()))},"
              f" {len(source.entries)} images listed; see --min-size, --caption-policy): nothing written",
              file=sys.stderr)
        return 1
    names = move_split_shards(tmp, out, args.split)
    shutil.rmtree(tmp)
    entry = {"shards": names, "count": sum(w.counts), "source": head["source"],
             "stats": stats.as_dict()}
    manifest = merge_manifest(out, {**head, "stats": stats.as_dict(), "splits": {args.split: entry}}, args.split)
    write_manifest(out, manifest)
    print(f"{sum(w.counts)} samples in {len(w.shards)} shards under {out} ({time.perf_counter() - t0:.1f} s); "
          f"skipped {dict(stats.skipped)}; splits in the manifest: {sorted(manifest['splits'])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return build(args)
    except (ValueError, OSError) as e:  # a bad metadata.jsonl or manifest, an unreadable file: named in one line
        print(f"make_shards.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
