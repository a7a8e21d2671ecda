"""The training data as a Lightning DataModule: an endless, exactly resumable stream of batches.

Lightning's notion of epochs is not used: the stream walks epoch after epoch of :class:`ldm.data.ResumableLoader`
(each rank and worker reading disjoint shards, every rank yielding the same number of batches), and the run ends at
``trainer.max_steps``. The position is the number of batches the module has consumed (``batches_seen``, saved in
every checkpoint); a resumed run starts the stream at that batch, so it sees exactly the batches the uninterrupted
run would have.
"""
from __future__ import annotations

import logging
from typing import Any, Iterator

import lightning as L
from omegaconf import DictConfig, OmegaConf

from ldm.data.shards import has_manifest, read_manifest
from ldm.data.transforms import BUCKET_MAX_RATIO, BUCKET_STEP, ImageTransform
from ldm.data.validate import CAPTION_POLICIES
from ldm.registry import ConfigError
from ldm.training.keys import boolean, number

log = logging.getLogger(__name__)

DATA_KEYS = {"train", "split", "size", "batch_size", "num_workers", "flip", "resize", "caption_policy",
             "shuffle_buffer", "num_samples", "allow_pipe", "min_size", "seed", "pin_memory", "bucket_step",
             "bucket_max_ratio", "val", "val_split", "val_num_samples"}
PIN_MEMORY = ("auto", True, False)  # auto: pinned host batches when the trainer runs on a CUDA device


class BatchStream:
    """Batches ``start, start+1, …`` of the epoch sequence of a :class:`ldm.data.ResumableLoader` factory (the
    same batches as walking its epochs one by one, see :meth:`ldm.data.ResumableLoader.endless`)."""

    def __init__(self, make_loader: Any, start_batch: int) -> None:
        self.make_loader, self.start = make_loader, start_batch

    def __iter__(self) -> Iterator[dict]:
        loader = self.make_loader(0)
        n = len(loader)
        if n == 0:
            raise ValueError("the training data gives no full batch per rank: lower data.batch_size or add data")
        epoch, skip = divmod(self.start, n)
        loader = self.make_loader(epoch)
        loader.load_state_dict({"epoch": epoch, "batches_consumed": skip})
        yield from loader.endless()  # one DataLoader for the whole run: its workers are not restarted per epoch


class DataModule(L.LightningDataModule):
    """Builds the training stream from the ``data`` section; ``position`` is set by the module on resume."""

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        d = cfg.data
        unknown = set(d.keys()) - DATA_KEYS
        if unknown:
            raise ConfigError(f"data: unknown key(s) {sorted(unknown)}; allowed: {', '.join(sorted(DATA_KEYS))}")
        if not d.get("train"):
            raise ConfigError("data.train: no training data given (a shard folder, shard pattern or image folder)")
        self.d = OmegaConf.to_container(d, resolve=True)
        if self.d.get("pin_memory", "auto") not in PIN_MEMORY:
            raise ConfigError(f"data.pin_memory: expected auto, true or false, got {self.d['pin_memory']!r}")
        check_data_values(self.d)
        self.seed = int(self.d["seed"]) if self.d.get("seed") is not None else int(cfg.train.get("seed", 0))
        if cfg.train.get("val_every_n_steps") and not (self.d.get("val") or self.d.get("val_split")):
            raise ConfigError("train.val_every_n_steps needs validation data: data.val (a shard folder, pattern or "
                              "image folder) and/or data.val_split (a split of data.train's manifest)")
        self._val: Any = None  # the validation loader, built on first use
        try:  # resize policy, size and buckets checked before any data is read
            ImageTransform(self.d.get("size"), self.d.get("resize", "center-crop"), **bucket_args(self.d))
        except ValueError as e:
            raise ConfigError(f"data: {e}") from None
        self.check_sources()

    def _spec(self, val: bool) -> tuple[Any, str | None, int | None, dict[str, str]]:
        """(spec, split, num_samples, the config keys errors name) of the training or the validation data.

        ``data.val_split`` picks a split of ``data.val`` when that is a directory with ``manifest.json``, else (no
        ``data.val``) a split of ``data.train``'s manifest. A ``data.val`` without a manifest is one set of samples:
        ``data.val_split`` (typically inherited from a config made for a manifest directory) is then not used, and a
        warning says so at start-up (:meth:`check_sources`)."""
        d = self.d
        if not val:
            return d["train"], d.get("split"), d.get("num_samples"), {
                "spec": "data.train", "split": "data.split", "num_samples": "data.num_samples"}
        names = {"spec": "data.val" if d.get("val") else "data.train", "split": "data.val_split",
                 "num_samples": "data.val_num_samples"}
        spec, split = d.get("val") or d["train"], d.get("val_split")
        if d.get("val") and split is not None and not has_manifest(spec):
            split = None
        return spec, split, d.get("val_num_samples"), names

    def check_sources(self) -> None:
        """At start-up, before any data is read: the training data (and the validation data when configured)
        exist, have the split asked for, and have a known sample count. Errors name the config key."""
        from ldm.data.distributed import check_known_count, resolve_source  # noqa: PLC0415

        d = self.d
        if d.get("val") and d.get("val_split") is not None and not has_manifest(d["val"]):
            log.warning("data.val_split=%r is not used: data.val=%r has no manifest.json, so all of it is the "
                        "validation set", d["val_split"], d["val"])
        for val in (False, True) if (d.get("val") or d.get("val_split") is not None) else (False,):
            spec, split, count, names = self._spec(val)
            try:
                source = resolve_source(spec, split=split, num_samples=count, allow_pipe=bool(d.get("allow_pipe")),
                                        arg_names={**names, **ARG_NAMES})
                check_known_count(source, spec, {**names, **ARG_NAMES})
            except (ValueError, TypeError, OSError) as e:
                raise ConfigError(str(e)) from None
            manifest = read_manifest(spec) if has_manifest(spec) else {}
            if manifest.get("kind") == "latents":
                check_latent_options(d, spec, manifest, names["spec"], val)

    def pin_memory(self) -> bool:
        """Whether the loader pins its batches: ``data.pin_memory``, or with ``auto`` (the default) whether the
        trainer runs on a CUDA device. A pinned batch reaches the GPU by DMA without a pageable staging copy on the
        host."""
        v = self.d.get("pin_memory", "auto")
        if v != "auto":
            return bool(v)
        tr = self.trainer
        return tr is not None and tr.strategy.root_device.type == "cuda"

    def _loader(self, epoch: int, rank: int, world: int, val: bool = False) -> Any:
        from ldm.data import make_dataloader  # noqa: PLC0415

        d = self.d
        spec, split, count, names = self._spec(val)
        return make_dataloader(spec, int(d["batch_size"]), num_workers=0 if val else int(d.get("num_workers", 0)),
                               rank=rank, world_size=world, seed=self.seed, epoch=epoch, split=split,
                               size=d.get("size"), resize=d.get("resize", "center-crop"),
                               flip=bool(d.get("flip", False)) and not val,
                               caption_policy=d.get("caption_policy", "skip"), min_size=int(d.get("min_size", 8)),
                               num_samples=count, shuffle_buffer=int(d.get("shuffle_buffer", 512)),
                               allow_pipe=bool(d.get("allow_pipe", False)), pin_memory=self.pin_memory(),
                               arg_names={**names, **ARG_NAMES}, **bucket_args(d))

    def val_batches(self, rank: int, world: int, limit: int) -> Iterator[dict]:
        """The first ``limit`` validation batches of this rank (fewer when the set is smaller): the same batches at
        every call (epoch 0 of a fixed-seed loader; no flips), disjoint across ranks, as many on every rank."""
        if self._val is None:
            self._val = self._loader(0, rank, world, val=True)
        self._val.set_epoch(0)
        for i, batch in enumerate(self._val):
            if i >= limit:
                break
            yield batch

    def batches_per_epoch(self, world_size: int) -> int:
        """Batches each of ``world_size`` ranks reads per epoch (the same on every rank)."""
        return len(self._loader(0, 0, world_size))

    def _rank(self) -> tuple[int, int]:
        tr = self.trainer
        return (tr.global_rank, tr.world_size) if tr is not None else (0, 1)

    def train_dataloader(self) -> BatchStream:
        rank, world = self._rank()
        start = int(getattr(self.trainer.lightning_module, "batches_seen", 0)) if self.trainer else 0
        if start:
            log.info("data: resuming at batch %d", start)
        return BatchStream(lambda epoch: self._loader(epoch, rank, world), start)

    def scale_batches(self) -> Iterator[dict]:
        """A fresh pass over the data (rank-disjoint) for measuring latent statistics."""
        rank, world = self._rank()
        return iter(self._loader(10_000, rank, world))


def _spec_value(v: Any) -> str | None:
    ok = (isinstance(v, str) and v) or (isinstance(v, (list, tuple)) and v and all(isinstance(x, str) and x for x in v))
    return None if ok else "a path, shard pattern or list of them"


def _split_value(v: Any) -> str | None:
    return None if v is None or (isinstance(v, str) and v) else "a split name or null"


#: data keys → their check (see :mod:`ldm.training.keys`); resize and pin_memory are checked separately
DATA_CHECKS = {
    "train": _spec_value, "val": lambda v: None if v is None else _spec_value(v),
    "split": _split_value, "val_split": _split_value,
    "batch_size": number(1, integer=True), "num_samples": number(1, integer=True, null=True),
    "val_num_samples": number(1, integer=True, null=True), "size": number(1, integer=True, null=True),
    "num_workers": number(0, integer=True), "shuffle_buffer": number(1, integer=True),
    "min_size": number(0, integer=True),
    "seed": number(0, integer=True, null=True), "flip": boolean(), "allow_pipe": boolean(),
    "caption_policy": lambda v: None if v in CAPTION_POLICIES else f"one of {', '.join(CAPTION_POLICIES)}",
    "bucket_step": number(1, integer=True), "bucket_max_ratio": number(1),
}
#: names the data loaders' errors use for the data keys that are not spec/split/count (see ARG_NAMES)
ARG_NAMES = {"min_size": "data.min_size", "caption_policy": "data.caption_policy"}


def check_data_values(d: dict) -> None:
    """Types and ranges of the ``data`` keys, before anything is built; a ConfigError names the key."""
    if d.get("batch_size") is None:
        raise ConfigError("data.batch_size: missing (expected a positive int)")
    for key, check in DATA_CHECKS.items():
        if key in d:
            want = check(d[key])
            if want:
                raise ConfigError(f"data.{key}: expected {want}, got {d[key]!r}")


def bucket_args(d: dict) -> dict[str, Any]:
    """``data.bucket_step`` / ``data.bucket_max_ratio`` (used with ``data.resize: bucket``; checked with the other
    data keys by :func:`check_data_values`) as loader arguments."""
    return {"bucket_step": d.get("bucket_step", BUCKET_STEP),
            "bucket_max_ratio": float(d.get("bucket_max_ratio", BUCKET_MAX_RATIO))}


def check_latent_options(d: dict, spec: Any, manifest: dict, key: str, val: bool) -> None:
    """A latent cache holds encoded images, which the loader does not transform: ``data.flip`` (training) cannot flip
    them, and a ``data.size`` or ``data.resize`` other than the ones the cache was encoded with (its manifest's
    ``extra``, when recorded) would not be applied. ConfigError naming the keys."""
    if d.get("flip") and not val:
        raise ConfigError(f"data.flip=true: {key}={spec!r} is a latent cache, whose latents are not flipped; "
                          "set data.flip=false (flips would have to be applied before encoding)")
    extra = manifest.get("extra") or {}
    for k in ("size", "resize"):
        if d.get(k) is not None and extra.get(k) is not None and d[k] != extra[k]:
            raise ConfigError(f"data.{k}={d[k]!r}: {key}={spec!r} is a latent cache encoded with {k}={extra[k]!r}, "
                              f"which the loader cannot change; set data.{k}={extra[k]!r} or re-encode the cache")


def check_buckets(cfg: DictConfig, stage: str, factor: int | None) -> None:
    """``data.resize: bucket`` for a stage: every bucket side a multiple of the autoencoder's ``factor`` (so a
    reconstruction or latent has the image's exact size); ``factor=None``: the stage takes one image size only."""
    d = cfg.get("data") or {}
    if d.get("resize") != "bucket":
        return
    if factor is None:
        raise ConfigError(f"train.stage={stage}: data.resize=bucket gives batches of several image shapes, and this "
                          "stage's image tower takes one size: use center-crop or pad")
    step = d.get("bucket_step", BUCKET_STEP)
    if step % factor:
        raise ConfigError(f"data.bucket_step={step} is not a multiple of the autoencoder's downsampling factor "
                          f"{factor}: bucket sides would not map to whole latents")


def build_datamodule(cfg: DictConfig) -> DataModule:
    return DataModule(cfg)
