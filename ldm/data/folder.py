"""Image folders with captions: ``img.png`` + ``img.txt`` side by side, or a ``metadata.jsonl`` with one
``{"file_name": "img.png", "text": "..."}`` per line (Hugging Face ``imagefolder`` layout; ``caption`` is accepted
for ``text``). Files are read as bytes and go through the same decoder and bad-input policy as shards."""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterator
from pathlib import Path

from torch.utils.data import Dataset

from ldm.data.shards import SampleDecoder, decode_stream
from ldm.data.transforms import BUCKET_MAX_RATIO, BUCKET_STEP, ImageTransform
from ldm.data.validate import IMAGE_EXTENSIONS, Skip, SkipStats, check_member_name

log = logging.getLogger(__name__)

METADATA = "metadata.jsonl"


def _read_metadata(root: Path) -> dict[str, str | None]:
    """``metadata.jsonl`` → {relative file name: caption or None}. Bad lines raise, naming file and line."""
    out: dict[str, str | None] = {}
    lines: dict[str, int] = {}
    dups: list[tuple[str, int, int]] = []
    try:
        raw = (root / METADATA).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{root / METADATA}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for i, line in enumerate(raw.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028 and the like
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name = row["file_name"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{root / METADATA} line {i}: expected a JSON object with 'file_name' ({e})") from None
        text = row.get("text", row.get("caption"))
        if str(name) in out:
            dups.append((str(name), lines[str(name)], i))
        out[str(name)] = text if isinstance(text, str) else None
        lines[str(name)] = i
    if dups:
        name, first, again = dups[0]
        log.warning("%s: %d row(s) repeat a file_name listed before (e.g. %r on lines %d and %d); the last row of "
                    "each is used", root / METADATA, len(dups), name, first, again)
    return out


def list_folder(root: str | os.PathLike) -> list[tuple[str, str | None, bool]]:
    """Sorted ``(relative image path, caption from metadata.jsonl or None, has_metadata)`` for a folder.

    With ``metadata.jsonl`` present its rows define the dataset (captions missing from a row stay None);
    otherwise every image under ``root`` is listed and its caption is read later from the sibling ``.txt``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    if (root / METADATA).exists():
        meta = _read_metadata(root)
        unlisted = [f for f in files if f not in meta]
        if unlisted:
            log.warning("image folder %s: %s defines the dataset; %d image(s) under it are not among its rows and are "
                        "not used, e.g. %s", root, METADATA, len(unlisted), ", ".join(unlisted[:3]))
        return [(name, meta[name], True) for name in sorted(meta)]
    return [(f, None, False) for f in files]


def caption_file(image: Path) -> Path | None:
    """The caption beside ``image``: same name with ``.txt`` (or ``.TXT``, ``.Txt``, as cameras and Windows tools
    write upper-case names); None when there is none."""
    return next((p for ext in (".txt", ".TXT", ".Txt") if (p := image.with_suffix(ext)).is_file()), None)


class FolderSource:
    """A folder split into units of ``chunk`` files, so ranks and workers read disjoint parts like shards.

    ``num_samples`` keeps only the first ``num_samples`` files in sorted order (:func:`list_folder`'s order); a
    larger value than the folder holds raises (it would promise samples that are not there)."""

    def __init__(self, root: str | os.PathLike, decoder: SampleDecoder | None = None, chunk: int = 256, *,
                 num_samples: int | None = None):
        self.root = Path(root)
        self.entries = list_folder(root)
        self.decoder, self.chunk = decoder or SampleDecoder(), chunk
        self.units: list[tuple[int, ...]] = []
        self.num_samples = len(self.entries)
        if num_samples is not None:
            self.limit(num_samples)
        self.units = [tuple(range(i, min(i + chunk, len(self.entries)))) for i in range(0, len(self.entries), chunk)]
        if not self.entries:
            log.warning("image folder %s holds no images", root)

    def limit(self, num_samples: int, name: str = "num_samples") -> None:
        """Keep the first ``num_samples`` files (sorted order); ``name`` is what errors call the setting."""
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"{name}: expected a positive int, got {num_samples!r}")
        if num_samples > len(self.entries):
            raise ValueError(f"{name}={num_samples}: image folder {str(self.root)!r} holds only {len(self.entries)} "
                             "images")
        self.entries = self.entries[:num_samples]
        self.num_samples = num_samples
        self.units = [tuple(range(i, min(i + self.chunk, num_samples))) for i in range(0, num_samples, self.chunk)]

    def _raw(self, index: int, stats: SkipStats) -> dict | None:
        name, caption, has_meta = self.entries[index]
        try:
            check_member_name(name)
        except Skip as s:
            stats.skip(s.reason, f"{self.root}:{name}")
            return None
        path = self.root / name
        key, ext = os.path.splitext(name)[0], path.suffix.lower().lstrip(".")
        raw: dict = {"__key__": key, "__url__": str(self.root)}
        if path.is_file() and ext in IMAGE_EXTENSIONS:
            raw[ext] = path.read_bytes()
        if has_meta:
            if caption is not None:
                raw["txt"] = caption.encode("utf-8")
        elif (txt := caption_file(path)) is not None:
            raw["txt"] = txt.read_bytes()
        return raw

    def iter_unit(self, unit: tuple[int, ...], stats: SkipStats, rng: random.Random | None = None) -> Iterator[dict]:
        """Decoded samples of one chunk of files."""
        raws = (r for r in (self._raw(i, stats) for i in unit) if r is not None)
        return decode_stream(raws, self.decoder, stats, rng)


class FolderDataset(Dataset):
    """Map-style dataset over an image folder. ``__getitem__`` returns None for a skipped sample (counted in
    ``stats``); use :func:`ldm.data.distributed.make_dataloader` for training, which drops them."""

    def __init__(self, root: str | os.PathLike, *, size: int | None = None, resize: str = "center-crop",
                 flip: bool = False, caption_policy: str = "skip", min_size: int = 8, bucket_step: int = BUCKET_STEP,
                 bucket_max_ratio: float = BUCKET_MAX_RATIO):
        transform = ImageTransform(size, resize, flip, bucket_step=bucket_step, bucket_max_ratio=bucket_max_ratio)
        decoder = SampleDecoder(transform, caption_policy, min_size)
        self.source = FolderSource(root, decoder)
        self.stats = SkipStats()

    def __len__(self) -> int:
        return len(self.source.entries)

    def __getitem__(self, index: int) -> dict | None:
        return next(iter(self.source.iter_unit((index,), self.stats)), None)

    def __iter__(self) -> Iterator[dict]:
        """Every kept sample in file order; skips counted in ``stats`` and reported at the end."""
        for unit in self.source.units:
            yield from self.source.iter_unit(unit, self.stats)
        self.stats.report(f"image folder {self.source.root}")
