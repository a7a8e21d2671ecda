"""Encode a dataset once with a frozen autoencoder (and optionally the text encoder) into latent shards.

    # from a model that has them: a released SD checkpoint (fine-tuning) or one of our text-to-image exports
    python scripts/cache_latents.py --model sd-v1-5.safetensors --data data/mine --out data/mine-latents --context
    # before the first U-Net run: the U-Net config with the autoencoder and text encoder exports it will train with
    python scripts/cache_latents.py --config configs/emoji/unet.yaml --data data/emoji64 --out data/emoji64-latents \\
        --split train,heldout --context \\
        train.components.first_stage_model=runs/autoencoder/model.safetensors \\
        train.components.cond_stage_model=runs/clip/model.safetensors
    python scripts/train.py --config configs/emoji/unet.yaml data.train=data/emoji64-latents ...

U-Net training then skips the encoders (published systems gain about 1.4×; the demo's U-Net stage on a CPU spends
about 40% of a step in them). Latents are stored unscaled (one posterior sample each, float16); the diffusion stage
applies the model's scale/shift, so a re-measured scale needs no re-encoding. With ``--context`` the text encoder's
token states are cached too; caption dropout then replaces dropped rows with the empty-prompt embedding.

The manifest records fingerprints of the encoders (``extra.encoders``): training refuses a cache encoded by another
autoencoder or text encoder than the run's, and of the data's files (``extra.data_files``: names, sizes, times).
A split already cached from the same, unchanged data with the same encoders is skipped; a cache of other encoders
or data, or of data changed since, is refused unless ``--overwrite`` (which replaces it).
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("cache_latents")


def build_parser() -> argparse.ArgumentParser:
    from ldm.data.transforms import BUCKET_MAX_RATIO, BUCKET_STEP, RESIZE_POLICIES  # noqa: PLC0415

    p = argparse.ArgumentParser(prog="cache_latents.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a model whose autoencoder (and text encoder) to use; without it, "
                   "--config with train.components.first_stage_model=... (the autoencoder export) builds one")
    p.add_argument("--config", default=None)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of --config (as scripts/train.py)")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="train", help="the split(s) to encode, comma-separated (train,heldout)")
    p.add_argument("--size", type=int, default=None, help="image size (default: the model's); with --resize bucket "
                   "the side of the square bucket")
    p.add_argument("--resize", choices=RESIZE_POLICIES, default="center-crop",
                   help="bucket: each image to its nearest aspect-ratio bucket (train with the same data.resize)")
    p.add_argument("--bucket-step", type=int, default=BUCKET_STEP, help="bucket sides' multiple, pixels")
    p.add_argument("--bucket-max-ratio", type=float, default=BUCKET_MAX_RATIO, help="largest bucket aspect ratio")
    p.add_argument("--context", action="store_true", help="also cache the text encoder's token states")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=500, help="samples per shard (the loader shuffles shards, "
                   "then samples within a buffer: many shards shuffle better, and every rank and worker reads its own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--overwrite", action="store_true",
                   help="replace a cache in --out written with other encoders or data, or from data whose files "
                   "changed since (else refused; one of the same encoders and unchanged data is reused)")
    return p


def main(argv: list[str] | None = None) -> int:
    from ldm.checkpoint import CheckpointError  # noqa: PLC0415
    from ldm.data.transforms import ImageTransform  # noqa: PLC0415

    p = build_parser()
    a = p.parse_args(argv)
    try:
        ImageTransform(a.size or 8, a.resize, bucket_step=a.bucket_step, bucket_max_ratio=a.bucket_max_ratio)
    except ValueError as e:
        p.error(str(e))
    check_args(p, a)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(a)
    except (ValueError, OSError, NotImplementedError, CheckpointError) as e:  # ConfigError is a ValueError
        log.error("%s", str(e).strip().replace("\n", " "))
        return 2


def check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Bad arguments fail before the model loads, each naming its argument (argparse's one-line error, status 2)."""
    from ldm.cli.paths import folder_problem  # noqa: PLC0415
    from ldm.cli.sample import check_device, check_model_kind  # noqa: PLC0415

    if a.model is None and a.config is None:
        p.error("give --model (a model with the autoencoder) or --config with train.components.first_stage_model=...")
    if a.model is not None and not Path(a.model).exists():
        p.error(f"--model: {a.model} not found")
    if a.config and not Path(a.config).is_file():
        p.error(f"--config: {a.config} not found")
    if a.overrides and not a.config:
        p.error(f"overrides {' '.join(a.overrides)}: they change --config, which is not given")
    for flag, value in (("--batch-size", a.batch_size), ("--shard-size", a.shard_size)):
        if value <= 0:
            p.error(f"{flag} {value}: must be positive")
    if a.size is not None and a.size <= 0:
        p.error(f"--size {a.size}: must be positive")
    a.splits = [s for s in a.split.split(",") if s]
    if not a.splits or any("/" in s or "\\" in s for s in a.splits):
        p.error(f"--split {a.split!r}: expected plain names, comma-separated (each prefixes the shard files)")
    if problem := folder_problem(a.out):
        p.error(f"--out: {a.out} {problem}")
    check_data(p, a)
    try:
        kind = out_kind(Path(a.out))
        if kind not in (None, "latents"):
            raise ValueError(f"--out {a.out}: holds a dataset of kind {kind!r}, not a latent cache; use another folder")
        a.device = check_device(a.device)
        a.cfg = check_config(a)
        if a.model is not None:
            check_model_kind(a.model, "--model", what="a text-to-image model (whose autoencoder and text encoder "
                             "are used; configs/*/unet.yaml exports)")
    except ValueError as e:
        p.error(str(e))


def check_data(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """--data exists; with a manifest, every --split is one of its splits; without one, a single --split (the name
    of the split written)."""
    from ldm.data.shards import has_manifest, read_manifest  # noqa: PLC0415
    from ldm.data.tario import expand_shards  # noqa: PLC0415

    root = Path(a.data)
    if has_manifest(root):
        try:
            have = sorted(read_manifest(root).get("splits", {}))
        except (OSError, ValueError) as e:
            p.error(f"--data: {root / 'manifest.json'}: {e}")
        for split in a.splits:
            if split not in have:
                p.error(f"--split {split}: not a split of {root / 'manifest.json'} (has {', '.join(have) or 'none'})")
    elif len(a.splits) > 1:  # without a manifest --split only names the output split: each would hold all of it
        p.error(f"--split {a.split}: --data {a.data} has no manifest.json, so it has no splits to encode apart "
                "(each split would hold all of it); encode one split per --data")
    if not has_manifest(root) and not root.is_dir():  # a shard file, a brace pattern or ::-joined patterns
        try:
            missing = [u for u in expand_shards(a.data) if not Path(u).is_file()]
        except ValueError as e:
            p.error(f"--data: {e}")
        if missing:
            p.error(f"--data: {missing[0]} not found" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def out_kind(out: Path) -> str | None:
    """The ``kind`` of the dataset whose manifest is in ``out`` (None when there is none); an unreadable manifest
    is a ValueError naming it."""
    from ldm.data.shards import has_manifest, read_manifest  # noqa: PLC0415

    if not has_manifest(out):
        return None
    try:
        return str(read_manifest(out).get("kind"))
    except (OSError, ValueError) as e:
        raise ValueError(f"--out {out}: unreadable manifest.json ({e}); move it away or use another folder") from None


def check_config(a: argparse.Namespace) -> Any:
    """--config with its overrides (None without --config): a text-to-image config, and, without --model, one that
    names the autoencoder export to encode with (an untrained autoencoder's latents are no use)."""
    from ldm.cli.sample import describe_target, model_target  # noqa: PLC0415
    from ldm.config import load_config  # noqa: PLC0415

    if not a.config:
        return None
    cfg = load_config(a.config, a.overrides)  # a ConfigError (a ValueError) names the file or the override
    target = model_target(cfg)
    if target not in (None, "LatentDiffusion"):
        raise ValueError(f"--config {a.config}: describes {describe_target(target)}, not a text-to-image model "
                         "(whose autoencoder and text encoder are used)")
    components = dict((cfg.get("train") or {}).get("components") or {})
    if a.model is None and not components.get("first_stage_model"):
        raise ValueError(f"--config {a.config} without --model: give the autoencoder export to encode with, "
                         "train.components.first_stage_model=PATH (and train.components.cond_stage_model=PATH for "
                         "our own text encoder)")
    for name, path in components.items():
        if not Path(str(path)).is_file():
            raise ValueError(f"train.components.{name}: {path} not found")
    return cfg


def load_model(a: argparse.Namespace) -> Any:
    """The text-to-image model whose encoders to use: --model (with --config), or --config's with its components."""
    import ldm  # noqa: PLC0415

    if a.model is not None:
        model = ldm.load(a.model, a.cfg, device=a.device)
    else:
        from ldm.diffusion.lightning import load_components  # noqa: PLC0415
        from ldm.loading import build  # noqa: PLC0415

        model = build(a.cfg)
        load_components(model, a.cfg.train.components)
        model = model.to(a.device).eval()
    if not hasattr(model, "vae"):
        raise ValueError(f"--model {a.model}: holds a {type(model).__name__}, not a text-to-image model")
    return model


def cache_identity(a: argparse.Namespace, model: Any, size: int) -> dict:
    """What the cache's latents depend on, stored as the manifest's ``extra``: equal → a split can be reused."""
    from ldm.data.latent_cache import data_fingerprint, encoder_fingerprints  # noqa: PLC0415

    vae = model.vae
    sources = {"model": str(Path(a.model).resolve())} if a.model else {
        f"components.{k}": str(Path(str(v)).resolve()) for k, v in a.cfg.train.components.items()}
    return {**sources, "data": str(Path(a.data).resolve()), "data_files": data_fingerprint(a.data),
            "size": size, "resize": a.resize,
            "bucket_step": a.bucket_step, "bucket_max_ratio": a.bucket_max_ratio, "seed": a.seed,
            "scale_factor": float(vae.scale_factor), "shift_factor": float(vae.shift_factor),
            "encoders": encoder_fingerprints(model, a.context)}


def run(a: argparse.Namespace) -> int:
    """Encode the splits into ``--out``; a cache there of other encoders or data is replaced (``--overwrite``) by one
    written aside and swapped in once every split is encoded, so an interrupted run leaves the old cache whole."""
    from ldm.data.latent_cache import is_up_to_date  # noqa: PLC0415

    model = load_model(a)
    size = a.size or int(model.config.model.params.image_size) * model.vae.downsample_factor
    extra = cache_identity(a, model, size)
    out = Path(a.out)
    replaced = prepare_out(out, extra, a.overwrite)
    work = out if replaced is None else staging(out)
    for split in a.splits:
        if is_up_to_date(work, split, extra):
            log.info("latent cache %s: split %s is up to date (same data and encoders), kept", out, split)
            continue
        encode_split(a, model, split, size, extra, work)
    if replaced is not None:
        swap_in(work, out, replaced)
    return 0


def prepare_out(out: Path, extra: dict, overwrite: bool) -> set[str] | None:
    """None when ``out`` holds no cache or one of the same ``extra`` (its splits are reused); else, with
    ``overwrite``, the names of the old cache's files (manifest and shards), to be replaced; without it, ValueError
    naming what differs (``data_files``: the data's files changed since)."""
    from ldm.data.shards import has_manifest, read_manifest  # noqa: PLC0415

    if not has_manifest(out):
        return None
    man = read_manifest(out)
    old = man.get("extra") or {}
    if old == extra:
        return None
    changed = sorted(k for k in set(extra) | set(old) if extra.get(k) != old.get(k))
    if not overwrite:
        raise ValueError(f"--out {out}: holds a latent cache of other encoders or data (differs in {', '.join(changed)}"
                         "); pass --overwrite to replace it, or use another folder")
    log.info("latent cache %s: differs in %s; a new one is written aside and replaces it when done", out,
             ", ".join(changed))
    return {"manifest.json", *(n for split in (man.get("splits") or {}).values() for n in split.get("shards", []))}


def staging(out: Path) -> Path:
    """An empty folder beside ``out`` for the cache that replaces it (an earlier interrupted one is cleared)."""
    work = out.parent / f".{out.name}-new"
    shutil.rmtree(work, ignore_errors=True)
    return work


def swap_in(work: Path, out: Path, old_cache: set[str]) -> None:
    """Put the finished cache ``work`` in ``out``'s place (two renames); the files of ``out`` that were not part
    of its old cache (``old_cache``) move along, the old cache is deleted."""
    old = out.parent / f".{out.name}-old"
    shutil.rmtree(old, ignore_errors=True)
    out.rename(old)
    work.rename(out)
    for f in old.iterdir():
        if f.name not in old_cache and not (out / f.name).exists():
            f.rename(out / f.name)
    shutil.rmtree(old)
    log.info("latent cache %s: replaced", out)


def encode_split(a: argparse.Namespace, model: Any, split: str, size: int, extra: dict, out: Path) -> None:
    """Encode every kept sample of ``split`` once, batched by shape (aspect-ratio buckets), the last batch of each
    shape partial (the training loader's equal-batch rule would drop the remainder); skipped samples are counted and
    reported by the dataset."""
    from ldm.data import FolderDataset, ShardDataset, collate, write_latent_cache  # noqa: PLC0415
    from ldm.data.distributed import batches_by_shape  # noqa: PLC0415

    root = Path(a.data)
    is_folder = root.is_dir() and not (root / "manifest.json").exists() and not any(root.glob("*.tar"))
    opts = dict(size=size, resize=a.resize, bucket_step=a.bucket_step, bucket_max_ratio=a.bucket_max_ratio)
    ds = FolderDataset(root, **opts) if is_folder else ShardDataset(a.data, split=split, **opts)
    loader = (collate(b) for b in batches_by_shape(iter(ds), a.batch_size, partial=True))
    gen = torch.Generator(device=a.device).manual_seed(a.seed)
    vae = model.vae
    encode = lambda x: vae.encode(x.to(a.device, model.dtype)).sample(generator=gen)  # noqa: E731 (raw, unscaled)
    text = (lambda caps: model.encode_text(caps)) if a.context else None  # noqa: E731
    write_latent_cache(loader, encode, out, text_fn=text, split=split, extra=extra, max_count=a.shard_size)


if __name__ == "__main__":
    sys.exit(main())
