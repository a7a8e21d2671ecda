"""Rank/worker splitting with equal batch counts, and a resumable data loader.

Choice (documented in docs/DATA.md): every rank yields exactly ``B = N // (world_size · batch_size)`` full batches
per epoch, where ``N`` is the known sample count (manifest, folder listing or ``num_samples``). Units (shards, or
chunks of folder files) are shuffled with ``(seed, epoch)`` — the same order on every rank — and dealt out to the
``world_size · num_workers`` (rank, worker) slots, so slots read disjoint units. A slot whose units run out before its
quota cycles over them again (reshuffled); a slot with more data stops early. Ranks therefore never wait on each other
at the end of an epoch, and every sample is seen about once. With fewer units than slots, every slot reads all units
and keeps every ``slots``-th sample instead (still disjoint).

Samples of different shapes (aspect-ratio buckets, ``resize: none``, a bucketed latent cache) are batched by shape:
each logical worker keeps one pending list per shape and emits a batch when a list reaches ``batch_size``
(:func:`batches_by_shape`). With one shape this is plain consecutive batching; with several, the batch count per
epoch and the resume rule stay as they are, and at most (shapes − 1)·(batch_size − 1) samples wait in a worker.

Batches are built inside the workers (the DataLoader runs with ``batch_size=None``): logical worker ``w`` makes batches
``k ≡ w (mod W)``, which the DataLoader's round-robin returns in order ``0, 1, 2, …``. Resuming after ``n`` batches
rotates the logical workers by ``n`` and drops the batches ``k < n`` (the samples are still read and decoded to keep
the random streams identical), so a resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ldm.data.folder import FolderSource
from ldm.data.shards import SampleDecoder, ShardSource, collate, has_manifest, manifest_split
from ldm.data.tario import expand_shards
from ldm.data.transforms import BUCKET_MAX_RATIO, BUCKET_STEP, ImageTransform
from ldm.data.validate import SkipStats

log = logging.getLogger(__name__)


def dist_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size): explicit values win, then ``torch.distributed`` when initialised, else (0, 1)."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank = torch.distributed.get_rank() if rank is None else rank
            world_size = torch.distributed.get_world_size() if world_size is None else world_size
        rank, world_size = (0 if rank is None else rank), (1 if world_size is None else world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    return rank, world_size


def assign_units(units: Sequence, rank: int, world_size: int, worker: int, num_workers: int,
                 seed: int, epoch: int) -> tuple[list, int, int]:
    """Units of one (rank, worker) slot → ``(units, sample_stride, sample_offset)``.

    Enough units: disjoint units, stride 1. Fewer units than slots: all units, keep samples ``i ≡ slot (mod slots)``.
    """
    order = list(units)
    random.Random(f"units-{seed}-{epoch}").shuffle(order)
    slots, slot = world_size * num_workers, rank + world_size * worker
    if len(order) >= slots:
        return order[slot::slots], 1, 0
    return order, slots, slot


def shape_of(sample: dict) -> tuple[int, ...]:
    """The shape that decides a sample's batch: its ``image`` (3, H, W) or ``latent`` (C, h, w)."""
    x = sample.get("image", sample.get("latent"))
    return tuple(x.shape) if isinstance(x, torch.Tensor) else ()


MAX_PENDING_SHAPES = 256  # more shapes than this waiting for a batch: the data is not bucketed (resize: none)


def batches_by_shape(samples: Iterator[dict], batch_size: int, *, partial: bool = False,
                     max_shapes: int = MAX_PENDING_SHAPES) -> Iterator[list[dict]]:
    """Lists of ``batch_size`` samples of one shape each (:func:`shape_of`), in the order they fill up. With
    ``partial`` the lists still pending when ``samples`` ends follow, in the order of their first sample.
    More than ``max_shapes`` shapes waiting at once raises (each would hold its samples in memory)."""
    pending: dict[tuple[int, ...], list[dict]] = {}
    for sample in samples:
        key = shape_of(sample)
        if key not in pending and len(pending) >= max_shapes:
            raise ValueError(f"more than {max_shapes} sample shapes wait for a batch of {batch_size} (the latest "
                             f"{sample.get('key', '?')!r}: {key}): images of many sizes cannot be batched as they "
                             "are; use data.resize=bucket (aspect-ratio buckets) or center-crop")
        group = pending.setdefault(key, [])
        group.append(sample)
        if len(group) == batch_size:
            yield pending.pop(key)
    if partial:
        yield from (group for group in pending.values() if group)


class EqualBatchesIterable(IterableDataset):
    """Yields collated batches; every rank yields exactly ``num_batches`` per epoch (see module docstring)."""

    def __init__(self, source, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 epoch: int = 0, start_batch: int = 0, num_batches: int | None = None,
                 shuffle_buffer: int = 512, stats: SkipStats | None = None):
        n = source.num_samples
        if num_batches is None:
            if n is None:
                raise ValueError("EqualBatchesIterable needs source.num_samples or num_batches")
            num_batches = n // (world_size * batch_size)
        if num_batches <= 0:
            raise ValueError(f"{n} samples cannot fill one batch of batch_size={batch_size} on each of "
                             f"world_size={world_size} ranks")
        self.source, self.batch_size, self.num_batches = source, batch_size, num_batches
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, epoch
        self.start_batch, self.shuffle_buffer = start_batch, shuffle_buffer
        self.stats = stats if stats is not None else SkipStats()

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start_batch)

    def _samples(self, worker: int, num_workers: int, epoch: int | None = None) -> Iterator[dict]:
        """Endless sample stream of one logical worker in ``epoch`` (default: this iterable's): its units pass after
        pass, each pass shuffled through a buffer that is drained at the end of the pass (so a pass yields each of
        its samples exactly once)."""
        epoch = self.epoch if epoch is None else epoch
        units, stride, offset = assign_units(self.source.units, self.rank, self.world_size, worker, num_workers,
                                             self.seed, epoch)
        rng = random.Random(f"samples-{self.seed}-{epoch}-{self.rank}-{worker}")
        slot_tag = "" if stride > 1 else f"-{self.rank}-{worker}"  # strided slots must share the unit order
        for n_pass in range(1 << 62):
            order = list(units)
            random.Random(f"order-{self.seed}-{epoch}-{n_pass}{slot_tag}").shuffle(order)
            buf: list[dict] = []
            seen = kept = 0
            for unit in order:
                for sample in self.source.iter_unit(unit, self.stats, rng):
                    seen += 1
                    if (seen - 1) % stride != offset:
                        continue
                    kept += 1
                    buf.append(sample)
                    if len(buf) >= self.shuffle_buffer:
                        yield buf.pop(rng.randrange(len(buf)))
            if kept == 0:
                raise RuntimeError(no_samples_message(f"rank {self.rank} worker {worker}: units {list(units)[:4]}",
                                                      self.source, self.stats))
            while buf:
                yield buf.pop(rng.randrange(len(buf)))
            log.debug("rank %d worker %d finished pass %d over %d units", self.rank, worker, n_pass, len(units))

    def _epoch_batches(self, epoch: int, worker: int, num_workers: int, first: int) -> Iterator[dict]:
        """Batches ``k ≡ worker (mod num_workers)``, ``k ≥ first``, of ``epoch``: logical worker ``worker``'s share.
        Batches before ``first`` are still drawn (and dropped) so the sample stream stays identical."""
        batches = batches_by_shape(self._samples(worker, num_workers, epoch), self.batch_size)
        for k in range(worker, self.num_batches, num_workers):
            batch = next(batches)  # the stream is endless: some shape always fills up
            if k >= first:
                yield collate(batch)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        phys, num_workers = (info.id, info.num_workers) if info else (0, 1)
        worker = (phys + self.start_batch) % num_workers  # rotation: physical worker 0 makes batch start_batch
        yield from self._epoch_batches(self.epoch, worker, num_workers, self.start_batch)
        self.stats.report(f"rank {self.rank} worker {worker}")


class EndlessBatches(EqualBatchesIterable):
    """Every epoch from ``epoch`` on, without end, starting at batch ``start_batch`` of the first: the same batches,
    in the same order, as walking :class:`EqualBatchesIterable` epoch after epoch, but through one DataLoader whose
    workers live for the whole run (a new DataLoader per epoch restarts its workers and refills their shuffle
    buffers, which stalls training every epoch when epochs are short).

    Physical worker ``p`` makes the global batches ``g ≡ start + p (mod W)``, ``g`` counted from the first batch
    of ``epoch``; in epoch ``e`` those are the batches of logical worker ``(start + p − (e − epoch)·n) mod W``."""

    def __len__(self) -> int:
        raise TypeError("EndlessBatches has no length: it never ends")

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        phys, num_workers = (info.id, info.num_workers) if info else (0, 1)
        n = self.num_batches
        for i in range(1 << 62):
            e, first = self.epoch + i, (self.start_batch if i == 0 else 0)
            worker = (self.start_batch + phys - i * n) % num_workers
            yield from self._epoch_batches(e, worker, num_workers, first)
            self.stats.report_epoch(f"rank {self.rank} worker {phys} after epoch {e}")


#: How errors name the arguments of :func:`resolve_source` / :func:`make_dataloader`; callers that build them from
#: a config pass the config keys instead (``{"spec": "data.val", "split": "data.val_split", …}``).
ARG_NAMES = {"spec": "spec", "split": "split", "num_samples": "num_samples", "min_size": "min_size",
             "caption_policy": "caption_policy"}

#: Skip reasons that a loader setting causes, → the setting (an :data:`ARG_NAMES` key) and what to change.
SKIP_SETTINGS = {"too_small": ("min_size", "lower it or use larger images"),
                 "missing_caption": ("caption_policy", "'empty' keeps uncaptioned images"),
                 "empty_caption": ("caption_policy", "'empty' keeps images with empty captions")}


def no_samples_message(where: str, source, stats: SkipStats) -> str:
    """Why a pass over some units kept nothing: the skip counts by reason and the settings that cause them."""
    names = {**ARG_NAMES, **getattr(source, "arg_names", {})}
    decoder = getattr(source, "decoder", None)
    hints = []
    for reason in sorted(stats.skipped):
        setting = SKIP_SETTINGS.get(reason)
        if setting is not None and decoder is not None and hasattr(decoder, setting[0]):
            hint = f"{names[setting[0]]}={getattr(decoder, setting[0])!r}: {setting[1]}"
            if hint not in hints:
                hints.append(hint)
    skipped = dict(sorted(stats.skipped.items())) or "nothing (the units hold no samples)"
    return (f"{where} yielded no usable samples: skipped {skipped}"
            + (f" ({'; '.join(hints)})" if hints else ""))


def _show(spec) -> str:
    """A spec as errors quote it (paths as plain strings)."""
    return repr(os.fspath(spec) if isinstance(spec, os.PathLike) else spec)


def check_spec_exists(spec, name: str = "spec", allow_pipe: bool = False) -> None:
    """Raise ``FileNotFoundError`` naming ``name`` when a path of ``spec`` (or a shard a pattern expands to) does
    not exist; pipe: URLs are not checked (they are commands)."""
    if isinstance(spec, (list, tuple)):
        for s in spec:
            check_spec_exists(s, name, allow_pipe)
        return
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"{name}: expected a path, shard pattern or list of them, got {type(spec).__name__} {spec!r}")
    text = os.fspath(spec)
    if not text:
        raise ValueError(f"{name}: empty data spec")
    if has_manifest(text) or os.path.isdir(text):
        return
    urls = [u for part in text.split("::") for u in
            ([part] if part.startswith("pipe:") or os.path.isdir(part) else expand_shards(part, allow_pipe=True))]
    missing = [u for u in urls if not u.startswith("pipe:") and not os.path.exists(u.removeprefix("file:"))]
    if missing:
        more = f" (and {len(missing) - 1} more of {len(urls)} shards)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"{name}: {missing[0]!r} not found{more}")


def resolve_source(spec, *, split: str | None = None, decoder: SampleDecoder | None = None,
                   allow_pipe: bool = False, num_samples: int | None = None, arg_names: dict | None = None):
    """A data spec → a source: a directory with ``manifest.json`` (image shards or a latent cache; ``split``
    selects the split, default ``train``), a directory of ``*.tar``, an image folder, or shard paths/patterns.

    Only a directory with ``manifest.json`` has splits: any other spec is one set of samples, so a ``split``
    other than None or ``"train"`` (the default's name) raises. ``num_samples`` overrides the known count; for an
    image folder it keeps the first ``num_samples`` files in sorted order. Missing paths raise
    ``FileNotFoundError``. Errors name the arguments by ``arg_names`` (see :data:`ARG_NAMES`)."""
    names = {**ARG_NAMES, **(arg_names or {})}
    if split is not None and not (isinstance(split, str) and split):
        raise ValueError(f"{names['split']}: expected a split name (a string) or null, got {split!r}")
    check_spec_exists(spec, names["spec"], allow_pipe)
    if has_manifest(spec):
        try:
            man, shards, count = manifest_split(spec, split)
        except KeyError as e:
            raise ValueError(f"{names['split']}: {e.args[0]}") from None
        count = num_samples if num_samples is not None else count
        if man.get("kind") == "latents":
            from ldm.data.latent_cache import LatentSource  # noqa: PLC0415 - avoids an import cycle
            source = LatentSource(shards, num_samples=count)
        else:
            source = ShardSource(shards, decoder, num_samples=count)
    elif split not in (None, "train"):
        raise ValueError(f"{names['split']}={split!r}: {names['spec']}={_show(spec)} has no manifest.json, so it has "
                         "no splits; splits need a directory with manifest.json (scripts/make_shards.py writes one)")
    elif isinstance(spec, (str, os.PathLike)) and Path(spec).is_dir() and any(Path(spec).glob("*.tar")):
        source = ShardSource(spec, decoder, num_samples=num_samples)
    elif isinstance(spec, (str, os.PathLike)) and Path(spec).is_dir():
        source = FolderSource(spec, decoder)
        if num_samples is not None:
            source.limit(num_samples, names["num_samples"])
    else:
        source = ShardSource(spec, decoder, allow_pipe=allow_pipe, num_samples=num_samples)
    source.arg_names = names
    return source


class ResumableLoader:
    """Iterates one epoch per ``for`` loop; ``state_dict()`` = ``{"epoch", "batches_consumed", …}`` resumes exactly."""

    def __init__(self, source, batch_size: int, *, num_workers: int = 0, rank: int = 0, world_size: int = 1,
                 seed: int = 0, epoch: int = 0, start_batch: int = 0, shuffle_buffer: int = 512,
                 pin_memory: bool = False):
        self.source, self.batch_size, self.num_workers = source, batch_size, num_workers
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.batches_consumed = epoch, start_batch
        self.shuffle_buffer, self.pin_memory = shuffle_buffer, pin_memory
        self.num_batches = len(self._iterable())

    def _iterable(self) -> EqualBatchesIterable:
        return EqualBatchesIterable(self.source, self.batch_size, rank=self.rank, world_size=self.world_size,
                                    seed=self.seed, epoch=self.epoch, start_batch=0,
                                    shuffle_buffer=self.shuffle_buffer)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict]:
        """One epoch (the rest of it after a resume). A batch counts as consumed once it has been handed out."""
        if self.batches_consumed >= self.num_batches:  # the previous epoch ended exactly at a break
            self.epoch, self.batches_consumed = self.epoch + 1, 0
        ds = self._iterable()
        ds.start_batch = self.batches_consumed
        dl = DataLoader(ds, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory)
        for batch in dl:
            self.batches_consumed += 1
            yield batch
        if self.batches_consumed >= self.num_batches:
            self.epoch, self.batches_consumed = self.epoch + 1, 0

    def endless(self) -> Iterator[dict]:
        """Every batch from the current position on, epoch after epoch, without end, through one DataLoader whose
        workers stay up (:class:`EndlessBatches`); the position advances as batches are handed out."""
        if self.batches_consumed >= self.num_batches:
            self.epoch, self.batches_consumed = self.epoch + 1, 0
        ds = EndlessBatches(self.source, self.batch_size, rank=self.rank, world_size=self.world_size,
                            seed=self.seed, epoch=self.epoch, start_batch=self.batches_consumed,
                            num_batches=self.num_batches, shuffle_buffer=self.shuffle_buffer)
        dl = DataLoader(ds, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                        prefetch_factor=4 if self.num_workers else None)
        for batch in dl:
            self.batches_consumed += 1
            if self.batches_consumed >= self.num_batches:
                self.epoch, self.batches_consumed = self.epoch + 1, 0
            yield batch

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch."""
        self.epoch, self.batches_consumed = epoch, 0

    def state_dict(self) -> dict:
        """Data position: the batch after ``batches_consumed`` of ``epoch`` comes next."""
        return {"epoch": self.epoch, "batches_consumed": self.batches_consumed, "seed": self.seed,
                "batch_size": self.batch_size, "world_size": self.world_size, "num_batches": self.num_batches}

    def load_state_dict(self, state: dict) -> None:
        """Restore a position; batch size, world size and seed must match (else the batches differ)."""
        for k in ("seed", "batch_size", "world_size"):
            if k in state and state[k] != getattr(self, k):
                raise ValueError(f"data state {k}={state[k]} does not match this loader's {k}={getattr(self, k)}")
        self.epoch, self.batches_consumed = int(state["epoch"]), int(state["batches_consumed"])


def make_dataloader(spec, batch_size: int, *, num_workers: int = 0, rank: int | None = None,
                    world_size: int | None = None, seed: int = 0, epoch: int = 0, start_batch: int = 0,
                    split: str | None = None, size: int | None = None, resize: str = "center-crop",
                    flip: bool = False, caption_policy: str = "skip", min_size: int = 8,
                    num_samples: int | None = None, shuffle_buffer: int = 512, allow_pipe: bool = False,
                    pin_memory: bool = False, bucket_step: int = BUCKET_STEP,
                    bucket_max_ratio: float = BUCKET_MAX_RATIO, arg_names: dict | None = None) -> ResumableLoader:
    """The training data loader: any spec (see :func:`resolve_source`) → batches ``{"image": (B, 3, H, W),
    "caption": [str], "key": [str]}`` (latent caches: ``"latent"`` (B, C, h, w), optional ``"context"``).
    H = W = ``size``, except with ``resize="bucket"`` (each batch one of :func:`ldm.data.transforms.aspect_buckets`
    ``(size, bucket_step, bucket_max_ratio)``) or ``"none"`` (each batch one size).

    ``arg_names`` maps argument names to what errors call them (config keys, see :data:`ARG_NAMES`)."""
    names = {**ARG_NAMES, **(arg_names or {})}
    rank, world_size = dist_info(rank, world_size)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    transform = ImageTransform(size, resize, flip, bucket_step=bucket_step, bucket_max_ratio=bucket_max_ratio)
    decoder = SampleDecoder(transform, caption_policy, min_size)
    source = resolve_source(spec, split=split, decoder=decoder, allow_pipe=allow_pipe, num_samples=num_samples,
                            arg_names=names)
    check_known_count(source, spec, names)
    return ResumableLoader(source, batch_size, num_workers=num_workers, rank=rank, world_size=world_size,
                           seed=seed, epoch=epoch, start_batch=start_batch, shuffle_buffer=shuffle_buffer,
                           pin_memory=pin_memory)


def check_known_count(source, spec, arg_names: dict | None = None) -> None:
    """Raise when ``source`` has no sample count (shards without a manifest need ``num_samples``)."""
    names = {**ARG_NAMES, **(arg_names or {})}
    if source.num_samples is None:
        raise ValueError(f"{names['spec']}={_show(spec)} has no known sample count: set {names['num_samples']} or use "
                         "a directory with manifest.json (scripts/make_shards.py writes one)")
