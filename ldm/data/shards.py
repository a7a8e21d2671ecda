"""webdataset-format shard reader: tar shards → ``{"image": (3, H, W) in [-1, 1], "caption": str, "key": str}``.

Decoding uses PIL, ``json`` and ``numpy.load(allow_pickle=False)`` only; no pickle is ever loaded. Each sample is
checked in a fixed order and counted under the first failing reason (see :mod:`ldm.data.validate`):
missing image → metadata JSON → caption (missing / non-UTF-8 / empty; ``.txt``, else the JSON's
``text``/``caption``) → image decode and size.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ldm.data.tario import expand_shards, iter_raw_samples
from ldm.data.transforms import BUCKET_MAX_RATIO, BUCKET_STEP, ImageTransform
from ldm.data.validate import IMAGE_EXTENSIONS, Skip, SkipStats, decode_caption, decode_image, decode_json

log = logging.getLogger(__name__)


class SampleDecoder:
    """Raw sample dict (ext → bytes) → decoded sample, or :class:`Skip`. Holds the bad-input policy."""

    def __init__(self, transform: ImageTransform | None = None, caption_policy: str = "skip",
                 min_size: int = 8, max_pixels: int = 8192 * 8192):
        self.transform = transform or ImageTransform(None, "none")
        self.caption_policy, self.min_size, self.max_pixels = caption_policy, min_size, max_pixels
        decode_caption(b"x", policy=caption_policy)  # validates the policy name early

    def __call__(self, raw: dict, stats: SkipStats, rng: random.Random | None = None) -> dict:
        where = f"{raw.get('__url__', '')}:{raw['__key__']}"
        ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
        if ext is None:
            raise Skip("missing_image", where)
        meta = decode_json(raw["json"], where) if "json" in raw else {}
        text = raw.get("txt")
        if text is None and isinstance(meta.get("text", meta.get("caption")), str):
            text = meta.get("text", meta.get("caption")).encode("utf-8")
        caption = decode_caption(text, policy=self.caption_policy, stats=stats, where=where)
        im = decode_image(raw[ext], min_size=self.min_size, max_pixels=self.max_pixels, stats=stats, where=where)
        sample = {"image": self.transform(im, rng), "caption": caption, "key": raw["__key__"]}  # image (3, H, W)
        if meta:
            sample["meta"] = meta
        return sample


def decode_stream(raws: Iterator[dict], decode, stats: SkipStats, rng: random.Random | None = None) -> Iterator[dict]:
    """Apply ``decode`` to raw samples, counting skips; yields the kept samples."""
    for raw in raws:
        try:
            sample = decode(raw, stats, rng)
        except Skip as s:
            stats.skip(s.reason, f"{raw.get('__url__', '')}:{raw.get('__key__', '')}")
            continue
        stats.kept += 1
        yield sample


def read_manifest(path: str | os.PathLike) -> dict:
    """Load ``manifest.json`` from a shard directory (or the file itself)."""
    p = Path(path)
    p = p / "manifest.json" if p.is_dir() else p
    with open(p, encoding="utf-8") as f:
        return json.load(f)


def manifest_split(root: str | os.PathLike, split: str | None = None) -> tuple[dict, list[str], int]:
    """``(manifest, shard paths, sample count)`` of one split (default ``train``) of a directory with a manifest."""
    root = Path(root)
    man = read_manifest(root)
    split = split or "train"
    if split not in man.get("splits", {}):
        raise KeyError(f"split {split!r} not in {root / 'manifest.json'} (has {sorted(man.get('splits', {}))})")
    entry = man["splits"][split]
    return man, [str(root / s) for s in entry["shards"]], int(entry["count"])


def existing_manifest(out: str | os.PathLike, new: dict, shared: Sequence[str]) -> dict | None:
    """The ``manifest.json`` already in ``out`` (None when there is none), checked against ``new`` before a split
    is added to it: the ``shared`` fields must be equal (the readers treat every split of a directory alike).
    Raises ValueError naming the file and the field."""
    path = Path(out) / "manifest.json"
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"existing {path} is unreadable ({e}); move it away or use another output directory") from None
    if not isinstance(old, dict) or not isinstance(old.get("splits"), dict):
        raise ValueError(f"existing {path} has no 'splits' mapping; move it away or use another output directory")
    for k in shared:
        if old.get(k) != new.get(k):
            raise ValueError(f"existing {path} has {k}={old.get(k)!r}, this run {k}={new.get(k)!r}: every split of "
                             "one directory must match; use another output directory")
    return old


def has_manifest(spec) -> bool:
    """Whether ``spec`` is a directory holding ``manifest.json``."""
    return isinstance(spec, (str, os.PathLike)) and (Path(spec) / "manifest.json").is_file()


class ShardSource:
    """A list of shards (units) plus how to decode them; the unit of splitting across ranks and workers."""

    def __init__(self, spec: str | os.PathLike | Sequence, decoder=None, *, allow_pipe: bool = False,
                 num_samples: int | None = None):
        self.units = expand_shards(spec, allow_pipe)
        self.decoder = decoder or SampleDecoder()
        self.allow_pipe, self.num_samples = allow_pipe, num_samples

    def iter_unit(self, url: str, stats: SkipStats, rng: random.Random | None = None) -> Iterator[dict]:
        """Decoded samples of one shard."""
        return decode_stream(iter_raw_samples(url, stats, self.allow_pipe), self.decoder, stats, rng)


class ShardDataset(IterableDataset):
    """Plain iterable over shards in order; DataLoader workers take disjoint shards (``i % num_workers``).
    A directory with ``manifest.json`` reads one split (``split``, default ``train``), never all of them.

    ``stats`` holds exact counts when iterated in this process (``num_workers=0``); each worker logs its own.
    For training use :func:`ldm.data.distributed.make_dataloader` (rank split, equal batch counts, resume).
    """

    def __init__(self, spec: str | os.PathLike | Sequence, *, size: int | None = None, resize: str = "center-crop",
                 flip: bool = False, caption_policy: str = "skip", min_size: int = 8,
                 max_pixels: int = 8192 * 8192, allow_pipe: bool = False, seed: int = 0, split: str | None = None,
                 bucket_step: int = BUCKET_STEP, bucket_max_ratio: float = BUCKET_MAX_RATIO):
        transform = ImageTransform(size, resize, flip, bucket_step=bucket_step, bucket_max_ratio=bucket_max_ratio)
        decoder = SampleDecoder(transform, caption_policy, min_size, max_pixels)
        if has_manifest(spec):
            spec = manifest_split(spec, split)[1]
        self.source = ShardSource(spec, decoder, allow_pipe=allow_pipe)
        self.stats, self.seed = SkipStats(), seed

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        rng = random.Random(f"{self.seed}-{wid}")
        for url in self.source.units[wid::nw]:
            yield from self.source.iter_unit(url, self.stats, rng)
        self.stats.report(f"ShardDataset worker {wid}/{nw}")


def collate(samples: list[dict]) -> dict:
    """Stack tensors (``image`` (B, 3, H, W), ``latent`` (B, C, h, w), ``context`` (B, L, D)); list the rest."""
    out: dict = {}
    for k in samples[0]:
        vals = [s[k] for s in samples]
        out[k] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
    return out
