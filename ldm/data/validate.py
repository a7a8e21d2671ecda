"""Checks on raw sample bytes: images, captions, tar member names, and the skip counter.

Every bad input has one defined outcome. Converted inputs (CMYK, 16-bit, palette, alpha) are counted in
``stats.converted``; dropped inputs raise :class:`Skip` with a reason that the readers count in ``stats.skipped``.

Reasons counted in ``stats.skipped`` (what one count means):

==========================  ============================================================================
``not_an_image``            sample: the image bytes are not a format PIL recognises
``truncated_image``         sample: the header parsed but the pixels did not decode (cut or corrupt file)
``too_small``               sample: ``min(w, h) < min_size`` (e.g. 1×1)
``too_large``               sample: ``w * h > max_pixels`` (decompression bomb), never decoded
``missing_image``           sample: no .png/.jpg/.jpeg/.webp member under the key
``missing_caption``         sample: no caption (policy ``"skip"``)
``empty_caption``           sample: caption is empty or whitespace (policy ``"skip"``)
``bad_caption_encoding``    sample: caption bytes are not UTF-8
``bad_metadata``            sample: the ``.json`` member is not valid UTF-8 JSON object
``missing_latent``          sample (latent cache): no ``.latent.npy`` member
``bad_latent``              sample: a ``.npy`` member is not a plain (non-object) numpy array
``unsafe_member``           tar member: absolute path, ``..`` component, link or device; never read
``ignored_extension``       tar member: extension not decoded (.pyd, .pickle, .pth, …); never read
``empty_shard``             shard: no samples at all
``corrupt_shard``           shard: the tar stream broke; samples read before the break are kept
==========================  ============================================================================
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import warnings
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
TEXT_EXTENSIONS = ("txt",)
#: Extensions the readers decode. Everything else (notably pickle-based .pyd/.pickle/.pth) is ignored, never loaded.
DECODED_EXTENSIONS = IMAGE_EXTENSIONS + TEXT_EXTENSIONS + ("json", "latent.npy", "context.npy")
CAPTION_POLICIES = ("skip", "empty")
EXAMPLES = 3  # skipped places named per reason in a report


class Skip(Exception):
    """A sample (or member, or shard) is dropped; ``reason`` is the counter key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class SkipStats:
    """Exact counts of what a reader kept, converted and skipped (by reason)."""

    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    converted: Counter = field(default_factory=Counter)
    # the first EXAMPLES places skipped for each reason, named in the report
    examples: dict = field(default_factory=dict, repr=False, compare=False)
    # (skipped, converted) at the last report_epoch, and what that epoch skipped and converted
    _last: tuple | None = field(default=None, repr=False, compare=False)
    _last_delta: tuple | None = field(default=None, repr=False, compare=False)

    def skip(self, reason: str, where: str = "") -> None:
        """Count one skip and log it at debug level (the summary is logged by :meth:`report`)."""
        self.skipped[reason] += 1
        self._example(reason, [where] if where else [])
        log.debug("skipped %s (%s)", where, reason)

    def _example(self, reason: str, places: list[str]) -> None:
        kept = self.examples.setdefault(reason, [])
        kept.extend(places[:max(0, EXAMPLES - len(kept))])

    def merge(self, other: "SkipStats") -> None:
        """Add another reader's counts to these."""
        self.kept += other.kept
        self.skipped.update(other.skipped)
        self.converted.update(other.converted)
        for reason, places in other.examples.items():
            self._example(reason, places)

    def as_dict(self) -> dict:
        """Plain dict (JSON-serialisable)."""
        return {"kept": self.kept, "skipped": dict(self.skipped), "converted": dict(self.converted)}

    def report(self, name: str = "reader") -> None:
        """Log the totals: a warning when anything was skipped, info otherwise."""
        level = logging.WARNING if self.skipped else logging.INFO
        named = "; ".join(f"{r}: {', '.join(p)}" for r, p in sorted(self.examples.items()) if p)
        log.log(level, "%s: kept %d, skipped %s, converted %s%s", name, self.kept,
                dict(sorted(self.skipped.items())), dict(sorted(self.converted.items())),
                f" (first skipped: {named})" if named else "")


    def report_epoch(self, name: str) -> None:
        """:meth:`report` after an epoch of an endless reader when the epoch skipped or converted other counts than
        the epoch before (the first epoch always); at debug level otherwise, so that the same totals are not
        repeated every epoch."""
        now = (Counter(self.skipped), Counter(self.converted))
        before = self._last or (Counter(), Counter())
        delta = tuple(sorted((a - b).items()) for a, b in zip(now, before))  # this epoch's skips, conversions
        self._last = now
        if delta == self._last_delta:
            log.debug("%s: kept %d, skipped %s, converted %s (as the epoch before)", name, self.kept,
                      dict(self.skipped), dict(self.converted))
            return
        self._last_delta = delta
        self.report(name)


def check_member_name(name: str) -> None:
    """Raise ``Skip("unsafe_member")`` for absolute paths, ``..`` components, drive letters or backslashes."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or "\\" in name:
        raise Skip("unsafe_member", name)
    if ".." in posixpath.normpath(name).split("/") or ".." in name.split("/"):
        raise Skip("unsafe_member", name)


def split_key(name: str) -> tuple[str, str]:
    """webdataset convention: ``dir/abc.latent.npy`` → (``dir/abc``, ``latent.npy``); extension lower-cased."""
    folder, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return (posixpath.join(folder, stem) if folder else stem), ext.lower() if dot else ""


def _to_8bit(im: Image.Image) -> Image.Image:
    """16/32-bit integer or float grayscale → 8-bit "L", scaling the full range (PIL's convert clips instead)."""
    arr = np.asarray(im)
    if im.mode.startswith("I;16") or (im.mode == "I" and arr.max(initial=0) > 255):
        arr = arr.astype(np.float64) / 257.0  # 65535 → 255
    elif im.mode == "F" and arr.max(initial=0.0) <= 1.0:
        arr = arr * 255.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")


def _composite_on_white(im: Image.Image) -> Image.Image:
    """RGBA → RGB over a white background (alpha-weighted), so transparent regions become white."""
    im = im.convert("RGBA")
    white = Image.new("RGBA", im.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, im).convert("RGB")


def to_rgb(im: Image.Image, stats: SkipStats | None = None) -> Image.Image:
    """Any PIL mode → 8-bit RGB: CMYK converted, 16-bit rescaled, palette/alpha composited on white."""
    converted = stats.converted if stats is not None else Counter()
    mode = im.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        converted["16bit"] += 1
        im, mode = _to_8bit(im), "L"
    if mode == "P":
        converted["palette"] += 1
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode in ("L", "RGB") and "transparency" in im.info):
        converted["alpha"] += 1
        return _composite_on_white(im)
    if mode == "CMYK":
        converted["cmyk"] += 1
    return im if mode == "RGB" else im.convert("RGB")


def decode_image(data: bytes, *, min_size: int = 8, max_pixels: int = 8192 * 8192,
                 stats: SkipStats | None = None, where: str = "") -> Image.Image:
    """Decode image bytes with PIL only → RGB image, or raise :class:`Skip` with the reason.

    The size checks run on the header, before any pixel is decoded, so a decompression bomb costs nothing.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise Skip("too_large", f"{where}: {e}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise Skip("not_an_image", f"{where}: {e}") from None
        w, h = im.size
        if w * h > max_pixels:
            raise Skip("too_large", f"{where}: {w}x{h} > max_pixels={max_pixels}")
        if min(w, h) < min_size:
            raise Skip("too_small", f"{where}: {w}x{h} < min_size={min_size}")
        try:
            im.load()
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, zlib.error, struct.error …
            raise Skip("truncated_image", f"{where}: {type(e).__name__}: {e}") from None
    return to_rgb(im, stats)


def decode_caption(data: bytes | None, *, policy: str = "skip", stats: SkipStats | None = None,
                   where: str = "") -> str:
    """Caption bytes → stripped str. Non-UTF-8 always skips; missing/empty skip or become "" by ``policy``."""
    if policy not in CAPTION_POLICIES:
        raise ValueError(f"caption policy must be one of {CAPTION_POLICIES}, got {policy!r}")
    if data is None:
        if policy == "skip":
            raise Skip("missing_caption", where)
        if stats is not None:
            stats.converted["missing_caption_as_empty"] += 1
        return ""
    try:
        text = data.decode("utf-8-sig" if data.startswith(b"\xef\xbb\xbf") else "utf-8").strip()
    except UnicodeDecodeError as e:
        raise Skip("bad_caption_encoding", f"{where}: {e}") from None
    if not text:
        if policy == "skip":
            raise Skip("empty_caption", where)
        if stats is not None:
            stats.converted["empty_caption_kept"] += 1
    return text


def decode_json(data: bytes, where: str = "") -> dict:
    """JSON object bytes → dict (plain ``json``: never executes or unpickles anything)."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Skip("bad_metadata", f"{where}: {e}") from None
    if not isinstance(obj, dict):
        raise Skip("bad_metadata", f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def decode_npy(data: bytes, where: str = "") -> np.ndarray:
    """``.npy`` bytes → array with ``allow_pickle=False`` (object arrays are refused)."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise Skip("bad_latent", f"{where}: {e}") from None
