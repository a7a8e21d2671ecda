"""Latent cache: encode images once with a frozen autoencoder (and captions with a frozen text encoder) into
shards, so U-Net training skips both encoders (MosaicML measured about 1.4× from this; see REFERENCE.md).

Each sample is ``key.latent.npy`` (C, h, w), ``key.txt`` and optionally ``key.context.npy`` (L, D), written with
``numpy.save(allow_pickle=False)`` and read with ``numpy.load(allow_pickle=False)``. ``manifest.json`` has
``kind: "latents"``, so :func:`ldm.data.distributed.make_dataloader` reads the directory directly. This module
imports no model: ``encode_fn`` is any callable images (B, 3, H, W) in [-1, 1] → latents (B, C, h, w), e.g. the
autoencoder's ``encode_latents``.
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
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldm.checkpoint import atomic_write
from ldm.data.shards import decode_stream, existing_manifest, has_manifest, read_manifest
from ldm.data.tario import (ShardWriter, expand_shards, iter_raw_samples, move_split_shards, shard_key,
                            shard_pattern)
from ldm.data.validate import Skip, SkipStats, decode_caption, decode_npy

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 30.0  # how often a long encoding logs its count


def _npy(x: torch.Tensor, dtype: np.dtype) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x.detach().float().cpu().numpy().astype(dtype), allow_pickle=False)
    return buf.getvalue()


@torch.no_grad()
def write_latent_cache(loader: Iterable[dict], encode_fn: Callable[[torch.Tensor], torch.Tensor],
                       out_dir: str | os.PathLike, *, text_fn: Callable[[list[str]], torch.Tensor] | None = None,
                       split: str = "train", dtype: str = "float16", max_count: int = 10000,
                       max_size: int = 1 << 30, device: torch.device | str | None = None,
                       extra: dict | None = None) -> dict:
    """Encode every batch of ``loader`` (``{"image": (B, 3, H, W), "caption": [str], "key": [str]}``) and write
    shards ``out_dir/{split}-%06d.tar`` plus ``out_dir/manifest.json``. Returns the manifest: ``latent_shape``
    (C, h, w) when every latent has one shape (else null) and ``latent_shapes`` ({"4x64x48": samples, …}: batches
    may differ in shape with aspect-ratio buckets; the training loader batches a cache by shape).

    ``text_fn(captions) → (B, L, D)`` adds ``context.npy``. ``dtype`` is the storage dtype ("float16"/"float32").
    ``extra`` (e.g. the autoencoder's scale/shift and the encoders' :func:`fingerprint`) is stored in the manifest.

    Writing a split into a directory that already holds a cache adds it to that manifest (the other splits are
    kept; ``latent_shapes`` sums over the splits); the existing cache must have the same ``kind``, ``dtype``,
    ``extra`` and ``context_shape``, else ValueError names the differing field (checked before encoding, where
    known then). The split's shards are written aside (``out_dir/.{split}-new``) and replace an earlier run's only
    when every batch is encoded, the manifest last: an interrupted run leaves the previous cache as it was.
    """
    out = Path(out_dir)
    if not split or "/" in split or "\\" in split:
        raise ValueError(f"split: expected a plain name (it prefixes the shard files), got {split!r}")
    head = {"format": "ldm-shards/1", "kind": "latents", "dtype": dtype, "extra": extra or {}}
    _merge_manifest(out, {**head, "splits": {split: {}}}, split, check_only=True)
    aside = out / f".{split}-new"
    shutil.rmtree(aside, ignore_errors=True)
    try:
        with ShardWriter(shard_pattern(aside, split), max_count=max_count, max_size=max_size) as writer:
            shapes, context_shape = _encode_into(writer, loader, encode_fn, text_fn, np.dtype(dtype), device)
        if not writer.shards:
            raise ValueError(f"latent cache {out} split {split!r}: the loader yielded no batches, nothing to cache")
        names = move_split_shards(aside, out, split)
    finally:
        shutil.rmtree(aside, ignore_errors=True)
    entry = {"shards": names, "count": sum(writer.counts), "latent_shapes": shapes}
    manifest = _merge_manifest(out, {**head, "latent_shape": _single(shapes), "latent_shapes": shapes,
                                     "context_shape": context_shape, "splits": {split: entry}}, split)
    text = json.dumps(manifest, indent=1)
    atomic_write(out / "manifest.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    log.info("latent cache %s: %d samples of split %s in %d shards", out, entry["count"], split, len(names))
    return manifest


def _encode_into(writer: ShardWriter, loader: Iterable[dict], encode_fn: Callable, text_fn: Callable | None,
                 np_dtype: np.dtype, device: torch.device | str | None) -> tuple[dict[str, int], list[int] | None]:
    """Encode the loader's batches into ``writer``: (samples per latent shape "CxHxW", the context's (L, D))."""
    shapes: dict[str, int] = {}
    context_shape = None
    used: set[str] = set()  # keys written: a dotted or repeated one is renamed (shard_key), else it would not read back
    next_report = time.monotonic() + PROGRESS_EVERY_S
    for batch in loader:
        if time.monotonic() >= next_report:
            log.info("latent cache: %d samples encoded", sum(shapes.values()))
            next_report += PROGRESS_EVERY_S
        images = batch["image"] if device is None else batch["image"].to(device)
        z = encode_fn(images)  # (B, C, h, w)
        c = text_fn(list(batch["caption"])) if text_fn is not None else None  # (B, L, D)
        name = "x".join(map(str, z.shape[1:]))
        shapes[name] = shapes.get(name, 0) + z.shape[0]
        context_shape = list(c.shape[1:]) if c is not None else None
        for i, key in enumerate(batch["key"]):
            sample = {"__key__": shard_key(key, used), "latent.npy": _npy(z[i], np_dtype), "txt": batch["caption"][i]}
            if c is not None:
                sample["context.npy"] = _npy(c[i], np_dtype)
            writer.write(sample)
    return shapes, context_shape


def fingerprint(module: torch.nn.Module, skip: tuple[str, ...] = ()) -> str:
    """A short hash of ``module``'s parameters (names, shapes and values rounded to float16, so a float16 file
    loaded in float32 for training and in float16 for caching agrees), leaving out names starting with ``skip``."""
    h = hashlib.sha256()
    for name, p in sorted(module.named_parameters()):
        if name.startswith(skip):
            continue
        h.update(f"{name}:{tuple(p.shape)};".encode())
        h.update(p.detach().to("cpu", torch.float16).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# What decides a cached latent: the autoencoder's encoder half (its decoder may be fine-tuned after caching)
DECODER_PARTS = ("decoder.", "post_quant_conv.")


def encoder_fingerprints(model: Any, context: bool) -> dict[str, str]:
    """Fingerprints of what a latent cache depends on: the autoencoder's encoder and, when the text encoder's token
    states are cached too (``context``), the text encoder. ``model``: a :class:`ldm.model.LatentDiffusion`."""
    out = {"first_stage_model": fingerprint(model.first_stage_model, DECODER_PARTS)}
    if context:
        out["cond_stage_model"] = fingerprint(model.cond_stage_model)
    return out


def check_cache_encoders(path: str | os.PathLike, model: Any, key: str = "data.train") -> None:
    """Raise ValueError when the latent cache at ``path`` was encoded by another autoencoder (or, with cached
    token states, another text encoder) than ``model``'s, naming the file, the component and ``key``. A cache
    written before fingerprints were recorded is trusted, with a log line saying it could not be checked."""
    man_path = Path(path) / "manifest.json"
    recorded = (read_manifest(path).get("extra") or {}).get("encoders")
    if not recorded:
        log.info("%s: latent cache %s records no encoder fingerprints; not checked against this model", key, path)
        return
    ours = encoder_fingerprints(model, "cond_stage_model" in recorded)
    for name, theirs in recorded.items():
        if ours[name] != theirs:
            raise ValueError(f"{key}: the latent cache {man_path} was encoded by a {name} with fingerprint {theirs}, "
                             f"this model's is {ours[name]}: re-encode it (scripts/cache_latents.py, --overwrite) "
                             f"with this run's {name}")
    log.info("%s: latent cache %s matches this model's %s", key, path, " and ".join(recorded))


def data_fingerprint(spec: str | os.PathLike) -> str:
    """A digest of the source data's files as they are now: each file's path (relative to a folder), size and
    modification time, so an edited caption, an added or removed image or a rewritten shard changes it (contents
    are not read: one ``stat`` per file). ``spec``: an image or shard folder (walked), a shard file, a brace pattern
    or ``::``-joined patterns."""
    h = hashlib.sha256()
    root = Path(spec)
    if root.is_dir():
        files = sorted((str(Path(d, f).relative_to(root)), os.path.join(d, f))
                       for d, _, names in os.walk(root) for f in names)
    else:
        files = [(u, u) for u in expand_shards(spec)]
    for name, path in files:
        st = os.stat(path)
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def is_up_to_date(out_dir: str | os.PathLike, split: str, extra: dict) -> bool:
    """Whether ``out_dir`` already holds ``split`` encoded with the same ``extra`` (encoders, source, size) and
    every shard its manifest lists."""
    out = Path(out_dir)
    if not has_manifest(out):
        return False
    try:
        man = read_manifest(out)
    except (OSError, ValueError):
        return False
    entry = (man.get("splits") or {}).get(split)
    return bool(man.get("kind") == "latents" and man.get("extra") == extra and entry and entry.get("count")
                and all((out / name).is_file() for name in entry.get("shards", [])))


def _single(shapes: dict[str, int]) -> list[int] | None:
    return [int(n) for n in next(iter(shapes)).split("x")] if len(shapes) == 1 else None


def _merge_manifest(out: Path, new: dict, split: str, *, check_only: bool = False) -> dict:
    """``new`` (one split) merged into an existing ``out/manifest.json``; a differing shared field raises."""
    old = existing_manifest(out, new, ("format", "kind", "dtype", "extra") + (() if check_only else ("context_shape",)))
    if old is None:
        return new
    splits = {**old["splits"], split: new["splits"][split]}
    if check_only:
        return {**old, "splits": splits}
    shapes: dict[str, int] = {}
    for name, entry in splits.items():
        # splits written before per-split shapes were recorded: the old top-level shapes stand for them
        per = entry.get("latent_shapes") if name == split or "latent_shapes" in entry else None
        for shape, n in (per or {}).items():
            shapes[shape] = shapes.get(shape, 0) + int(n)
    if any("latent_shapes" not in e for e in splits.values()):
        for shape, n in (old.get("latent_shapes") or {}).items():
            shapes[shape] = shapes.get(shape, 0) + int(n)
    return {**old, **new, "splits": splits, "latent_shapes": shapes, "latent_shape": _single(shapes)}


def decode_latent_sample(raw: dict, stats: SkipStats, rng: random.Random | None = None) -> dict:
    """Raw latent-cache sample → ``{"latent": (C, h, w) float32, "caption": str, "key": str, "context"?: (L, D)}``."""
    where = f"{raw.get('__url__', '')}:{raw['__key__']}"
    if "latent.npy" not in raw:
        raise Skip("missing_latent", where)
    caption = decode_caption(raw.get("txt"), policy="empty", stats=stats, where=where)
    latent = decode_npy(raw["latent.npy"], where)
    sample = {"latent": torch.from_numpy(latent.astype(np.float32)), "caption": caption, "key": raw["__key__"]}
    if "context.npy" in raw:
        sample["context"] = torch.from_numpy(decode_npy(raw["context.npy"], where).astype(np.float32))
    return sample


class LatentSource:
    """Latent-cache shards as a source for :class:`ldm.data.distributed.EqualBatchesIterable`."""

    def __init__(self, spec, *, num_samples: int | None = None, allow_pipe: bool = False):
        self.units = expand_shards(spec, allow_pipe)
        self.num_samples, self.allow_pipe = num_samples, allow_pipe

    def iter_unit(self, url: str, stats: SkipStats, rng: random.Random | None = None) -> Iterator[dict]:
        """Decoded samples of one shard."""
        return decode_stream(iter_raw_samples(url, stats, self.allow_pipe), decode_latent_sample, stats, rng)


def read_latent_cache(path: str | os.PathLike, split: str = "train") -> Iterator[dict]:
    """Iterate a latent cache directory in order (no shuffling, one process): ``{"latent", "caption", "key",
    "context"?}``."""
    root = Path(path)
    man = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    if man.get("kind") != "latents":
        raise ValueError(f"{root / 'manifest.json'} is not a latent cache (kind={man.get('kind')!r})")
    source = LatentSource([str(root / s) for s in man["splits"][split]["shards"]])
    stats = SkipStats()
    for url in source.units:
        yield from source.iter_unit(url, stats)
    stats.report(f"latent cache {root}")
