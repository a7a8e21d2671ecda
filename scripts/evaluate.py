#!/usr/bin/env python
"""Evaluate a trained emoji text-to-image model on prompts it never saw in training.

    python scripts/evaluate.py --model runs/unet/model.safetensors --clip runs/clip/model.safetensors \
        --data data/emoji64 --out runs/eval [--n 256] [--samplers dpmpp_2m:20,ddim:50] [--inception-weights PATH]

For each split (heldout: concepts never trained; style_transfer_eval: concepts trained only in the other style;
train: for reference) it samples one image per caption with fixed seeds and reports, in the feature space of the
project's own CLIP (trained on the training split): the Fréchet distance to the real images of that split
(``fd_clip``), image→text caption recall top-1/top-5 among the split's distinct captions (``retrieval@1/5``: a hit
when the image's own caption text is among the k most similar; identical captions are one candidate, so retrieving
the duplicate of an image's caption counts as correct), and the same two for the real images as the reference
floor/ceiling; autoencoder reconstruction PSNR/SSIM on the real held-out images; all by
style (noto/fluent). FID/KID need Inception weights, which cannot be downloaded here: they are computed (per split,
with the real-vs-real floor) only with ``--inception-weights`` (the pytorch-fid / torch-fidelity FID Inception state
dict, loaded with ``weights_only=True``; ``pip install ldm[eval]``) and otherwise reported as absent.
Per-category breakdown (Unicode categories from the dataset manifest) for every group of more than 16 samples.
Writes ``metrics.json`` and grids of samples next to the real images.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

import torch

log = logging.getLogger("ldm.evaluate")

MIN_IMAGES = 4  # per split: the real-vs-real floors split a set in halves of >= 2 (a Fréchet distance's minimum)
SNAPSHOT_KEYS = ("step", "train_s", "path")  # what evaluate_snapshots reads from every index.jsonl record


def categories(data: str) -> dict[str, str]:
    """``{sample key: category}`` from the dataset's manifest.json ({} when it has none)."""
    man = Path(data) / "manifest.json"
    if not man.is_file():
        return {}
    return json.loads(man.read_text(encoding="utf-8")).get("category_by_key", {})


def real_split(data: str, split: str, n: int, size: int) -> dict:
    """``n`` real images of ``split`` (all of them, with a warning, when the split holds fewer), fixed order.

    Samples the loader skips (unreadable images, missing captions) are counted in a warning and never stand in as
    repeats of other images: the loader's stream wraps around to fill a batch, so a split with skipped samples would
    otherwise be evaluated with duplicates.

    Raises:
        ValueError: the split has fewer than ``MIN_IMAGES`` (readable) images; the message names --data and the split.
    """
    from ldm.data import EqualBatchesIterable, make_dataloader

    where = f"--data {data}, split {split!r}"
    try:
        source = make_dataloader(data, 1, split=split, size=size).source
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
    count = int(source.num_samples)
    if count < MIN_IMAGES:
        raise ValueError(f"{where}: holds {count} images, fewer than the {MIN_IMAGES} an evaluation needs")
    m = min(n, count)
    if m < n:
        log.warning("split %s holds %d images, fewer than --n %d: evaluating all %d", split, count, n, m)
    ds = EqualBatchesIterable(source, m, rank=0, world_size=1, seed=123, shuffle_buffer=4096)
    try:
        batch = next(iter(ds))
    except RuntimeError as e:  # not one sample of the split could be read
        raise ValueError(f"{where}: {e}") from e
    first: dict[str, int] = {}
    for i, key in enumerate(batch["key"]):
        first.setdefault(key, i)
    keep = sorted(first.values())
    reasons = ", ".join(sorted(ds.stats.skipped)) or "none"  # the loader's skip reasons (counts span passes)
    if len(keep) < MIN_IMAGES:
        raise ValueError(f"{where}: only {len(keep)} of its {count} images could be read (skipped: {reasons}), "
                         f"fewer than the {MIN_IMAGES} an evaluation needs")
    if len(keep) < m:
        log.warning("split %s: only %d of its %d images could be read (skipped: %s): evaluating %d", split,
                    len(keep), count, reasons, len(keep))
    elif ds.stats.skipped:
        log.warning("split %s: some images could not be read (skipped: %s); drew %d readable ones", split, reasons,
                    len(keep))
    cat = categories(data)
    captions = [batch["caption"][i] for i in keep]
    log_repeated_captions(split, captions)
    return {"image": batch["image"][torch.tensor(keep)], "caption": captions,
            "category": [cat.get(batch["key"][i], "Other") for i in keep]}


def log_repeated_captions(split: str, captions: list[str]) -> int:
    """Log how many images of ``split`` share their caption with another (retrieval ranks the distinct captions, so
    an image whose caption repeats is scored against that text once); returns the number of distinct captions."""
    counts = Counter(captions)
    shared = sum(n for n in counts.values() if n > 1)
    if shared:
        log.info("split %s: %d of %d images share their caption with another image; caption retrieval ranks the %d "
                 "distinct captions (retrieving an identical caption counts as correct)", split, shared,
                 len(captions), len(counts))
    return len(counts)


def by_group(m: dict, groups: list[str], gi: torch.Tensor, fr: torch.Tensor, ft: torch.Tensor, captions: list[str],
             min_n: int) -> None:
    """Add ``group/fd_clip`` and ``group/retrieval@1`` (retrieval among the group's own distinct captions) for every
    group with more than ``min_n`` samples, and ``group/n``."""
    from ldm.evaluation import frechet_distance, retrieval_accuracy

    for g in sorted(set(groups)):
        idx = torch.tensor([i for i, x in enumerate(groups) if x == g])
        if len(idx) > min_n:
            m[f"{g}/n"] = len(idx)
            m[f"{g}/fd_clip"] = frechet_distance(gi[idx], fr[idx])
            caps = [captions[i] for i in idx.tolist()]
            m[f"{g}/retrieval@1"] = retrieval_accuracy(gi[idx], ft[idx], 1, caps)
            m[f"{g}/real_retrieval@1"] = retrieval_accuracy(fr[idx], ft[idx], 1, caps)


def clip_image_size(clip) -> tuple[int, int] | None:
    """(H, W) the CLIP's image tower takes (open_clip's ``visual.image_size``); None when it does not say."""
    size = getattr(getattr(getattr(clip, "model", None), "visual", None), "image_size", None)
    if size is None:
        return None
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def to_clip_size(images: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] resized to the CLIP's input ``size`` (bicubic, antialiased), if they differ."""
    if size is None or tuple(images.shape[-2:]) == size:
        return images
    return torch.nn.functional.interpolate(images.float(), size=size, mode="bicubic", antialias=True,
                                           align_corners=False).clamp(-1, 1)


@torch.no_grad()
def clip_features(clip, images: torch.Tensor, captions: list[str], bs: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized CLIP image and caption features; images at another size than the CLIP's are resized to it."""
    from ldm.conditioning.contrastive import clip_normalize

    dev, size = next(clip.parameters()).device, clip_image_size(clip)
    fi = torch.cat([clip.encode_image(clip_normalize(to_clip_size(images[i:i + bs].to(dev), size)),
                                      normalize=True).float().cpu()
                    for i in range(0, len(images), bs)])
    ft = torch.cat([clip.encode_text_features(captions[i:i + bs], normalize=True).float().cpu()
                    for i in range(0, len(captions), bs)])
    return fi, ft


@torch.no_grad()
def generate_all(model, captions: list[str], sampler: str, steps: int, guidance: float, bs: int) -> torch.Tensor:
    out = []
    for i in range(0, len(captions), bs):
        x = model.generate(captions[i:i + bs], sampler=sampler, steps=steps, guidance=guidance, seed=1000 + i,
                           output="tensor", progress=False)  # (b, 3, H, W) in [0, 1]
        out.append(x.cpu() * 2 - 1)
    return torch.cat(out)


def inception_split(inc, real: dict, fake: torch.Tensor) -> dict:
    """FID and KID (Inception-v3 pool features) of generated vs real images of a split; real features cached."""
    from ldm.evaluation import frechet_distance
    from ldm.inception_metrics import inception_features, kid_from_features

    if "inception" not in real:
        real["inception"] = inception_features(inc, real["image"])
    fr, gi = real["inception"], inception_features(inc, fake)
    kid, kid_std = kid_from_features(gi, fr, subset_size=min(100, len(fr), len(gi)))
    return {"fid": frechet_distance(gi, fr), "kid": kid, "kid_std": kid_std,
            "fid_real_halves": frechet_distance(fr[::2], fr[1::2])}


def split_metrics(clip, real: dict, fake: torch.Tensor, inc=None) -> dict:
    from ldm.evaluation import frechet_distance, retrieval_accuracy

    fr, ft = clip_features(clip, real["image"], real["caption"])
    gi, _ = clip_features(clip, fake, real["caption"])
    styles = ["fluent" if c.endswith("fluent emoji") else "noto" for c in real["caption"]]
    caps = real["caption"]  # identical captions are one candidate of the retrieval (ldm.evaluation)
    m = {"n": len(fake), "fd_clip": frechet_distance(gi, fr), "retrieval@1": retrieval_accuracy(gi, ft, 1, caps),
         "retrieval@5": retrieval_accuracy(gi, ft, 5, caps), "real_retrieval@1": retrieval_accuracy(fr, ft, 1, caps),
         "real_retrieval@5": retrieval_accuracy(fr, ft, 5, caps),
         # the floor: FD between two halves of the real images, and generated half vs real other half (same n)
         "fd_clip_real_halves": frechet_distance(fr[::2], fr[1::2]),
         "fd_clip_gen_vs_real_half": frechet_distance(gi[::2], fr[1::2])}
    by_group(m, styles, gi, fr, ft, caps, 8)
    by_group(m, [f"category:{c}" for c in real["category"]], gi, fr, ft, caps, 16)
    if inc is not None:
        m.update(inception_split(inc, real, fake))
    return m


@torch.no_grad()
def reconstruction(vae, images: torch.Tensor, bs: int = 64) -> dict:
    from ldm.evaluation import psnr, ssim

    dev = next(vae.parameters()).device
    rec = torch.cat([vae.decode(vae.encode(images[i:i + bs].to(dev)).mode()).float().cpu()
                     for i in range(0, len(images), bs)])
    x, y = (images + 1) / 2, ((rec + 1) / 2).clamp(0, 1)
    return {"psnr": float(psnr(x, y).mean()), "ssim": float(ssim(x, y).mean())}


def save_grid(real: torch.Tensor, fake: torch.Tensor, captions: list[str], path: Path, n: int = 16) -> None:
    from ldm.grid import make_grid
    from ldm.pipeline_io import images_to_pil

    ims = images_to_pil(((torch.cat([fake[:n], real[:n]]) + 1) / 2).clamp(0, 1))
    ims = [im.resize((96, 96), 0) for im in ims]
    caps = [f"gen: {c}" for c in captions[:n]] + [f"real: {c}" for c in captions[:n]]
    make_grid(ims, ncols=8, captions=caps, caption_chars=16).save(path)


def evaluate_model(model, clip, reals: dict, samplers: list[tuple[str, int]], a, out: Path) -> dict:
    """All splits of ``reals`` ({split: real images and captions}); the held-out split with every sampler."""
    res: dict = {}
    for split, real in reals.items():
        for k, (sampler, steps) in enumerate(samplers if split == "heldout" else samplers[:1]):
            t0 = time.time()
            fake = generate_all(model, real["caption"], sampler, steps, a.guidance, a.batch_size)
            sample_s = time.time() - t0  # sampling alone, features excluded
            m = split_metrics(clip, real, fake, a.inception)
            m["sample_s"] = sample_s
            res[f"{split}/{sampler}:{steps}"] = m
            log.info("%s %s:%d %s", split, sampler, steps, {k2: round(v, 4) for k2, v in m.items()})
            if k == 0 and out is not None:
                save_grid(real["image"], fake, real["caption"], out / f"grid_{split}.png")
        if split == "heldout":
            res["autoencoder_heldout"] = reconstruction(model.vae, real["image"])
    return res


def snapshot_path(index: Path, path: str) -> Path:
    """A snapshot's model file: ``path`` as recorded, else (a relative path from another working directory, or a
    moved run) the same ``step_*/model.safetensors`` next to ``index`` (the training writes both in one folder)."""
    p = Path(path)
    if p.is_file() or p.is_absolute():
        return p
    return index.parent / p.parent.name / p.name


def read_snapshot_index(index: Path) -> list[dict]:
    """The records of ``index.jsonl`` (blank lines ignored), each with ``path`` resolved by :func:`snapshot_path`.

    Raises:
        FileNotFoundError: ``index`` or a model file it lists does not exist (naming index:line).
        ValueError: a line is not a JSON object with ``step``, ``train_s`` and ``path`` (naming index:line).
    """
    if not index.is_file():
        raise FileNotFoundError(f"--snapshots: {index} not found (train with train.snapshot_every_min=N)")
    recs = []
    for no, line in enumerate(index.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"--snapshots: {index}:{no} is not JSON ({e})") from None
        missing = [k for k in SNAPSHOT_KEYS if not isinstance(rec, dict) or k not in rec]
        if missing:
            raise ValueError(f"--snapshots: {index}:{no} lacks {', '.join(missing)} (a record of "
                             "train.snapshot_every_min has step, train_s, images, path)")
        path = snapshot_path(index, str(rec["path"]))
        if not path.is_file():
            raise FileNotFoundError(f"--snapshots: {index}:{no}: snapshot {rec['path']} not found")
        recs.append({**rec, "path": str(path)})
    if not recs:
        raise ValueError(f"--snapshots: {index} lists no snapshot")
    return recs


def evaluate_snapshots(index: Path, clip, reals: dict, samplers: list[tuple[str, int]], a, dev: str) -> list[dict]:
    """The metric-vs-training-time curve: every snapshot listed in ``index`` (``index.jsonl`` written by
    ``train.snapshot_every_min``), first sampler only, no grids."""
    import ldm

    curve = []
    for rec in read_snapshot_index(index):
        model = ldm.load(rec["path"], use_ema=True, device=dev)
        rec["metrics"] = evaluate_model(model, clip, reals, samplers[:1], a, None)
        curve.append(rec)
        log.info("snapshot step %d (%.0f s): %s", rec["step"], rec["train_s"],
                 {k: round(v["fd_clip"], 4) for k, v in rec["metrics"].items() if "fd_clip" in v})
    return curve


def sampler_list(text: str) -> list[tuple[str, int]]:
    """``--samplers``: "name:steps,…" → [(name, steps), …]; argparse reports a bad entry with the accepted form."""
    from ldm.diffusion.samplers import SAMPLERS

    out = []
    for item in text.split(","):
        name, colon, steps = item.strip().partition(":")
        if not colon:
            raise argparse.ArgumentTypeError(f"{item!r} has no step count: expected name:steps,… e.g. dpmpp_2m:20")
        if name not in SAMPLERS:
            raise argparse.ArgumentTypeError(f"{item!r}: unknown sampler {name!r} "
                                             f"(one of {', '.join(sorted(SAMPLERS))})")
        if not steps.strip().isdigit() or int(steps) <= 0:
            raise argparse.ArgumentTypeError(f"{item!r}: steps must be a positive integer (name:steps, e.g. {name}:20)")
        out.append((name, int(steps)))
    return out


def split_list(text: str) -> list[str]:
    """``--splits``: "a,b,…" → [a, b, …], each named once."""
    splits = [s.strip() for s in text.split(",")]
    if not all(splits):
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated split names, e.g. heldout,train")
    dup = sorted({s for s in splits if splits.count(s) > 1})
    if dup:
        raise argparse.ArgumentTypeError(f"{text!r}: split(s) {dup} named twice")
    return splits


def check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Bad arguments fail before minutes of sampling, naming the argument."""
    from ldm.cli.paths import folder_problem
    from ldm.cli.sample import check_device, check_model_kind
    from ldm.data.shards import has_manifest, read_manifest

    if a.n < 4:
        p.error(f"--n {a.n}: at least 4 images per split (the real-vs-real floors split them in halves)")
    if a.batch_size <= 0:
        p.error(f"--batch-size {a.batch_size}: must be positive")
    if a.snapshots:
        try:
            read_snapshot_index(Path(a.snapshots))
        except (OSError, ValueError) as e:
            p.error(str(e))
    if a.snapshots and "heldout" not in a.splits:
        p.error("--snapshots scores the held-out split: add heldout to --splits")
    for flag, path in (("--model", a.model), ("--clip", a.clip), ("--inception-weights", a.inception_weights)):
        if path and not Path(path).is_file():
            p.error(f"{flag}: {path} not found")
    if not Path(a.data).exists() and not any(c in a.data for c in "{:"):  # a path, not a shard pattern or URL
        p.error(f"--data: {a.data} not found")
    if has_manifest(a.data):
        try:
            entries = read_manifest(Path(a.data)).get("splits", {})
        except (OSError, ValueError) as e:
            p.error(f"--data: {e}")
        have = sorted(entries)
        unknown = [s for s in a.splits if s not in have]
        if unknown:
            p.error(f"--splits: {', '.join(unknown)} not in {Path(a.data) / 'manifest.json'} (has {', '.join(have)})")
        small = [f"{s} ({entries[s].get('count')})" for s in a.splits
                 if isinstance(entries[s], dict) and isinstance(entries[s].get("count"), int)
                 and entries[s]["count"] < MIN_IMAGES]
        if small:
            p.error(f"--splits: {', '.join(small)} in {Path(a.data) / 'manifest.json'}: fewer than the {MIN_IMAGES} "
                    "images an evaluation needs")
    if problem := folder_problem(a.out):
        p.error(f"--out: {a.out} {problem}")
    try:
        a.device = check_device(a.device)
        check_model_kind(a.model, "--model")
        check_model_kind(a.clip, "--clip", want="OpenCLIPTextEncoder",
                         what="a CLIP export (the contrastive image/text model of configs/*/clip.yaml)")
    except ValueError as e:
        p.error(str(e))


def main(argv: list[str] | None = None) -> int:
    from ldm.checkpoint import CheckpointError

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--clip", required=True, help="the CLIP export used as the feature space (trained on train)")
    p.add_argument("--data", default="data/emoji64")
    p.add_argument("--splits", type=split_list, default="heldout,style_transfer_eval,train",
                   help="comma-separated splits of --data's manifest.json")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--samplers", type=sampler_list, default="dpmpp_2m:20",
                   help="name:steps,… (first one for the split metrics)")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--snapshots", default=None,
                   help="also evaluate every snapshot in this index.jsonl (train.snapshot_every_min) → curve.json")
    p.add_argument("--inception-weights", default=None,
                   help="local FID Inception-v3 weights (pt_inception-2015-12-05-6726825d.pth): adds fid/kid per split")
    p.add_argument("--out", default="runs/eval")
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    check_args(p, a)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(a)
    except (ValueError, OSError, NotImplementedError, CheckpointError) as e:
        log.error("%s", str(e).strip().replace("\n", " "))
        return 2


def run(a: argparse.Namespace) -> int:
    import ldm
    from ldm.loading import load_component

    dev = a.device
    model = ldm.load(a.model, use_ema=True, device=dev)
    if not hasattr(model, "generate"):
        raise ValueError(f"--model {a.model}: holds a {type(model).__name__}, not a text-to-image model")
    clip = load_component(a.clip, device=dev)
    if not callable(getattr(clip, "encode_image", None)) or getattr(clip, "with_visual", True) is False:
        raise ValueError(f"--clip {a.clip}: holds a {type(clip).__name__} without an image encoder, not a CLIP export")
    size = int(model.config.model.params.image_size) * model.vae.downsample_factor
    clip_size = clip_image_size(clip)
    if clip_size is not None and clip_size != (size, size):
        log.warning("--clip %s takes %d×%d images: the %d×%d real and generated images are resized to it for the "
                    "CLIP metrics", a.clip, *clip_size, size, size)
    samplers = a.samplers
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    reals = {split: real_split(a.data, split, a.n, size) for split in a.splits}
    a.inception = None
    res: dict = {"model": a.model, "clip": a.clip, "n_requested": a.n, "guidance": a.guidance,
                 "n_by_split": {split: len(r["caption"]) for split, r in reals.items()}}
    if a.inception_weights:
        from ldm.inception_metrics import load_inception

        a.inception = load_inception(a.inception_weights, dev)
        res["inception_weights"] = a.inception_weights
    else:
        res["fid"] = "absent: no --inception-weights (Inception-v3 weights cannot be downloaded here)"
        log.warning("FID/KID not computed: no --inception-weights file given (none can be downloaded here)")
    res.update(evaluate_model(model, clip, reals, samplers, a, out))
    (out / "metrics.json").write_text(json.dumps(res, indent=1))
    log.info("wrote %s", out / "metrics.json")
    if a.snapshots:
        curve = evaluate_snapshots(Path(a.snapshots), clip, {"heldout": reals["heldout"]}, samplers, a, dev)
        (out / "curve.json").write_text(json.dumps(curve, indent=1))
        log.info("wrote %s (%d points)", out / "curve.json", len(curve))
    return 0


if __name__ == "__main__":
    sys.exit(main())
