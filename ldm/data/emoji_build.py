"""The embedded emoji dataset, part 2: records, rendering to shards per split, manifest, contact sheet.

``build_emoji_dataset(out, size)`` writes ``out/{train,heldout,style_transfer_eval}-%06d.tar`` (members
``key.png``, ``key.txt``, ``key.json`` with style/concept/split/name) and ``out/manifest.json``. Running it again with
the same arguments, packages and split lists does nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import shutil
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from ldm.checkpoint import atomic_write
from ldm.data import emoji_names as names
from ldm.data.emoji import PACKAGES, load_categories, load_icons, render_icon
from ldm.data.tario import ShardWriter, shard_pattern

log = logging.getLogger(__name__)
BUILD_VERSION = 2  # 2: Unicode category per icon


@dataclass
class EmojiRecord:
    """One icon to render."""

    style: str
    name: str
    slug: str
    caption: str
    concept: str
    split: str
    hidden: bool
    category: str = "Other"

    @property
    def key(self) -> str:
        return f"{self.style}_{self.name}"


def make_records(icon_sets: dict[str, dict], heldout: set[str] | None = None,
                 style_transfer: dict[str, str] | None = None,
                 categories: dict[str, dict[str, str]] | None = None) -> list[EmojiRecord]:
    """``{style: icons.json dict}`` → records with captions, concepts and splits (committed lists by default).

    ``categories``: ``{style: {icon name: Unicode category}}``; a concept takes the category any style gives it
    (Noto has them, Fluent does not), else "Other".
    """
    heldout = names.load_heldout() if heldout is None else heldout
    style_transfer = names.load_style_transfer() if style_transfer is None else style_transfer
    out = []
    for style, data in icon_sets.items():
        tone_bases = names.fluent_tone_bases(data["icons"]) if style == "fluent" else None
        for name, icon in data["icons"].items():
            slug = names.to_slug(name, style, tone_bases)
            c = names.concept(slug)
            out.append(EmojiRecord(style, name, slug, names.caption(slug, style), c,
                                   names.assign_split(c, style, heldout, style_transfer), bool(icon.get("hidden"))))
    by_concept = {r.concept: categories[r.style][r.name] for r in out
                  if categories and r.name in categories.get(r.style, {})}
    for r in out:
        r.category = by_concept.get(r.concept, "Other")
    return out


def _render_png(args: tuple[dict, dict, int]) -> bytes:
    icon, defaults, size = args
    buf = io.BytesIO()
    render_icon(icon, defaults, size).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _build_key(size: int, max_count: int) -> dict:
    def digest(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    return {"version": BUILD_VERSION, "size": size, "max_count": max_count,
            "packages": {p.style: p.sha256 for p in PACKAGES},
            "heldout": digest(names.HELDOUT_FILE), "style_transfer": digest(names.STYLE_TRANSFER_FILE)}


def _up_to_date(out: Path, key: dict) -> dict | None:
    try:
        man = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    shards = [out / s for sp in man.get("splits", {}).values() for s in sp["shards"]]
    return man if man.get("build") == key and all(p.exists() for p in shards) else None


def count_table(records: list[EmojiRecord]) -> dict:
    """Counts per split and style, plus concept and caption totals."""
    by = Counter((r.split, r.style) for r in records)
    return {
        "by_style": dict(Counter(r.style for r in records)),
        "by_split": {sp: {st: by[(sp, st)] for st in ("noto", "fluent")} for sp in names.SPLITS},
        "total": len(records),
        "concepts": len({r.concept for r in records}),
        "concepts_by_split": {sp: len({r.concept for r in records if r.split == sp}) for sp in names.SPLITS},
        "unique_captions_without_style": len({names.caption_text(r.slug) for r in records}),
        "by_category": dict(sorted(Counter(r.category for r in records).items())),
    }


def build_emoji_dataset(out: str | os.PathLike, size: int = 64, *, cache: str | os.PathLike | None = None,
                        workers: int | None = None, max_count: int = 500, force: bool = False) -> dict:
    """Render both packages at ``size`` px into shards per split under ``out``; returns the manifest."""
    out = Path(out)
    key = _build_key(size, max_count)
    if not force and (man := _up_to_date(out, key)) is not None:
        log.info("emoji dataset in %s is up to date (%d images); nothing to do", out, man["counts"]["total"])
        return man
    t0 = time.perf_counter()
    icon_sets = {p.style: load_icons(p, cache) for p in PACKAGES}
    records = make_records(icon_sets, categories={p.style: load_categories(p, cache) for p in PACKAGES})
    log.info("loaded %d icons in %.1f s; rendering at %d px", len(records), time.perf_counter() - t0, size)
    random.Random("ldm-emoji-order").shuffle(records)  # shards mix styles and concepts
    aside = out / ".build-new"  # rendered aside: an interrupted build leaves the previous one whole
    if aside.exists():
        shutil.rmtree(aside)
    try:
        writers = _render_shards(records, icon_sets, size, max_count, workers, aside)
    except BaseException:
        shutil.rmtree(aside, ignore_errors=True)
        raise
    counts = count_table(records)
    manifest = {
        "format": "ldm-shards/1", "kind": "images", "dataset": "emoji", "size": size, "build": key,
        "sources": {p.style: {"package": f"{p.name}@{p.version}", "sha256": p.sha256, "license": p.license}
                    for p in PACKAGES},
        "counts": counts, "seconds": round(time.perf_counter() - t0, 1),
        "category_by_key": {r.key: r.category for r in sorted(records, key=lambda r: r.key)},
        "splits": {sp: {"shards": [Path(s).name for s in w.shards], "count": sum(w.counts),
                        "by_style": counts["by_split"][sp]} for sp, w in writers.items()},
    }
    _move_in(aside, out, manifest)
    log.info("emoji %dpx: %s in %.1f s", size, json.dumps(counts), manifest["seconds"])
    return manifest


def _render_shards(records: list[EmojiRecord], icon_sets: dict[str, dict], size: int, max_count: int,
                   workers: int | None, where: Path) -> dict[str, ShardWriter]:
    """Render every record into ``where/<split>-NNNNNN.tar``; the finished writers by split."""
    jobs = [(icon_sets[r.style]["icons"][r.name], _defaults(icon_sets[r.style]), size) for r in records]
    where.mkdir(parents=True)
    n_split = Counter(r.split for r in records)
    writers = {sp: ShardWriter(shard_pattern(where, sp), max_count=_balanced(n_split[sp], max_count))
               for sp in names.SPLITS}
    with ExitStack() as stack:
        for w in writers.values():
            stack.enter_context(w)
        pool = stack.enter_context(ProcessPoolExecutor(max_workers=workers or os.cpu_count()))
        for rec, png in zip(records, pool.map(_render_png, jobs, chunksize=32), strict=True):
            meta = {"style": rec.style, "concept": rec.concept, "split": rec.split, "name": rec.name,
                    "hidden": rec.hidden, "category": rec.category}
            writers[rec.split].write({"__key__": rec.key, "png": png, "txt": rec.caption, "json": json.dumps(meta)})
    return writers


def _move_in(aside: Path, out: Path, manifest: dict) -> None:
    """Replace ``out``'s shards and manifest by the build in ``aside``: the old manifest goes first (no manifest
    ever lists shards of another build), the new one is written aside and renamed last."""
    (out / "manifest.json").unlink(missing_ok=True)
    for old in out.glob("*.tar"):
        old.unlink()
    for shard in sorted(aside.glob("*.tar")):
        shard.replace(out / shard.name)
    text = json.dumps(manifest, indent=1)
    atomic_write(out / "manifest.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    shutil.rmtree(aside)


def _balanced(n: int, max_count: int) -> int:
    """Per-shard count that fills ceil(n / max_count) shards evenly (no tiny last shard)."""
    shards = max(1, -(-n // max_count))
    return max(1, -(-n // shards))


def _defaults(data: dict) -> dict:
    return {k: data[k] for k in ("width", "height", "left", "top") if k in data}


def contact_sheet(icon_sets: dict[str, dict], records: list[EmojiRecord], path: str | os.PathLike,
                  size: int = 64, pairs: int = 48, cols: int = 8, seed: int = 0) -> Path:
    """A grid of noto/fluent pairs of the same concept (noto left, fluent right), for eyeballing the renders."""
    by_concept: dict[str, dict[str, EmojiRecord]] = {}
    for r in records:
        if r.slug == r.concept and not r.hidden:  # default tone, visible icons
            by_concept.setdefault(r.concept, {})[r.style] = r
    both = sorted(c for c, d in by_concept.items() if len(d) == 2)
    chosen = random.Random(seed).sample(both, min(pairs, len(both)))
    rows = -(-len(chosen) // cols)
    pad = size // 8
    sheet = Image.new("RGB", (cols * (2 * size + pad) + pad, rows * (size + pad) + pad), (200, 200, 200))
    for i, c in enumerate(chosen):
        x, y = pad + (i % cols) * (2 * size + pad), pad + (i // cols) * (size + pad)
        for j, style in enumerate(("noto", "fluent")):
            r = by_concept[c][style]
            sheet.paste(render_icon(icon_sets[style]["icons"][r.name], _defaults(icon_sets[style]), size),
                        (x + j * size, y))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return Path(path)


def record_dicts(records: list[EmojiRecord]) -> list[dict]:
    """Records as plain dicts (for JSON dumps and tests)."""
    return [asdict(r) for r in records]
