#!/usr/bin/env python
"""Build a dataset once into webdataset shards.

    python scripts/prepare_data.py emoji --size 64 --out data/emoji64 [--cache DIR] [--workers N]
        [--contact-sheet docs/emoji_contact_sheet.png] [--force]

Fetches ``@iconify-json/noto@1.2.9`` and ``@iconify-json/fluent-emoji@1.2.7`` with ``npm pack`` into the cache
(default ``~/.cache/ldm/npm``), verifies their sha256, renders every icon at ``--size`` px on white and writes
``OUT/{train,heldout,style_transfer_eval}-NNNNNN.tar`` plus ``OUT/manifest.json``. A second run with the same
arguments is a no-op. See docs/DATA.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time

from ldm.cli.paths import folder_problem
from ldm.data.emoji import PACKAGES, load_icons
from ldm.data.emoji_build import build_emoji_dataset, contact_sheet, make_records
from ldm.data.emoji_names import SPLITS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=["emoji", "emoji-fixture"],
                   help="emoji: the full dataset; emoji-fixture: the small committed test fixture (maintainers)")
    p.add_argument("--size", type=int, default=64, choices=[32, 64, 128, 256], help="image side in pixels")
    p.add_argument("--out", required=True, help="output directory for shards and manifest.json")
    p.add_argument("--cache", default=None, help="npm tarball cache (default ~/.cache/ldm/npm)")
    p.add_argument("--workers", type=int, default=None, help="render processes (default: all cores)")
    p.add_argument("--max-count", type=int, default=500, help="at most this many samples per shard")
    p.add_argument("--contact-sheet", default=None, help="also write a contact-sheet PNG here")
    p.add_argument("--force", action="store_true", help="rebuild even when the manifest matches")
    args = p.parse_args(argv)
    for flag, path in (("--out", args.out), ("--cache", args.cache)):
        if path is not None and (problem := folder_problem(path)):
            p.error(f"{flag} {path}: {problem}")
    if args.workers is not None and args.workers < 1:
        p.error(f"--workers {args.workers}: must be positive")
    if args.max_count < 1:
        p.error(f"--max-count {args.max_count}: must be positive")
    return args


def print_counts(man: dict) -> None:
    """Counts per split and style as a small table on stdout."""
    print(f"{'split':<22}{'noto':>8}{'fluent':>8}{'total':>8}{'shards':>8}")
    for sp in SPLITS:
        e = man["splits"][sp]
        print(f"{sp:<22}{e['by_style']['noto']:>8}{e['by_style']['fluent']:>8}{e['count']:>8}{len(e['shards']):>8}")
    c = man["counts"]
    print(f"{'all':<22}{c['by_style']['noto']:>8}{c['by_style']['fluent']:>8}{c['total']:>8}")
    print(f"concepts {c['concepts']} ({json.dumps(c['concepts_by_split'])}); "
          f"distinct captions without style {c['unique_captions_without_style']}")


FIXTURE_ICONS = {
    "noto": ["grinning-face", "red-heart", "woman-pilot-medium-dark-skin-tone", "letter-i", "flag-martinique",
             "horizontal-traffic-light", "bust-in-silhouette", "medium-dark-skin-tone"],
    "fluent": ["grinning-face", "red-heart", "woman-pilot-medium-dark", "horizontal-traffic-light", "tongue", "egg",
               "bomb", "hole"],
}


def write_fixture(out: str, size: int, cache: str | None, per_style: int = 120) -> None:
    """tests/fixtures/emoji: all icon names, a few raw icons, and ``per_style`` renders per style in one shard."""
    import random  # noqa: PLC0415

    from ldm.data.emoji_build import _render_png  # noqa: PLC0415
    from ldm.data.tario import ShardWriter  # noqa: PLC0415

    os.makedirs(out, exist_ok=True)
    icon_sets = {p.style: load_icons(p, cache) for p in PACKAGES}
    for style, data in icon_sets.items():
        with open(os.path.join(out, f"names_{style}.txt"), "w", encoding="utf-8") as f:
            f.write("".join(f"{n}\n" for n in data["icons"]))
        subset = {k: v for k, v in data.items() if k not in ("icons", "aliases")}
        subset["icons"] = {n: data["icons"][n] for n in FIXTURE_ICONS[style]}
        with open(os.path.join(out, f"icons_{style}.json"), "w", encoding="utf-8") as f:
            json.dump(subset, f, indent=0)
    records = make_records(icon_sets)
    chosen = [r for r in records if r.name in FIXTURE_ICONS[r.style]]
    for style in ("noto", "fluent"):
        pool = sorted((r for r in records if r.style == style and r not in chosen), key=lambda r: r.name)
        chosen += random.Random(f"fixture-{style}").sample(pool, per_style - len(FIXTURE_ICONS[style]))
    with ShardWriter(os.path.join(out, f"emoji{size}-%06d.tar"), max_count=10 ** 6) as w:
        for r in chosen:
            data = icon_sets[r.style]
            defaults = {k: data[k] for k in ("width", "height", "left", "top") if k in data}
            meta = {"style": r.style, "concept": r.concept, "split": r.split, "name": r.name, "hidden": r.hidden}
            w.write({"__key__": r.key, "png": _render_png((data["icons"][r.name], defaults, size)),
                     "txt": r.caption, "json": json.dumps(meta)})
    print(f"fixture: {len(chosen)} renders at {size} px in {out}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return build(args)
    except (ValueError, OSError) as e:  # a bad tarball, an unwritable --out: named in one line
        print(f"prepare_data.py: error: {e}", file=sys.stderr)
    except subprocess.CalledProcessError as e:
        print(f"prepare_data.py: error: {' '.join(map(str, e.cmd))} failed (exit status {e.returncode}): is the npm "
              "registry reachable? (or put the tarballs in --cache)", file=sys.stderr)
    return 2


def build(args: argparse.Namespace) -> int:
    """The dataset (or the test fixture) as ``args`` say; its counts printed."""
    if args.dataset == "emoji-fixture":
        write_fixture(args.out, args.size, args.cache)
        return 0
    t0 = time.perf_counter()
    man = build_emoji_dataset(args.out, args.size, cache=args.cache, workers=args.workers,
                              max_count=args.max_count, force=args.force)
    print_counts(man)
    print(f"build time (this run) {time.perf_counter() - t0:.1f} s; first build {man['seconds']} s")
    if args.contact_sheet:
        icon_sets = {p.style: load_icons(p, args.cache) for p in PACKAGES}
        path = contact_sheet(icon_sets, make_records(icon_sets), args.contact_sheet, size=args.size)
        print(f"contact sheet: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
