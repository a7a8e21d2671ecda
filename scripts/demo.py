#!/usr/bin/env python
"""``make demo``: the main job on the embedded default, end to end on a CPU in about 15 minutes.

1. renders the emoji dataset (two pinned npm packages) to webdataset shards;
2. trains the autoencoder, our own CLIP text encoder and the text-to-image U-Net, each from its YAML config (the
   U-Net on latents and token states encoded once by the first two: ``scripts/cache_latents.py``);
3. samples a grid for held-out prompts (concepts never seen in training) and training prompts.

The sizes are the emoji configs scaled down for a 2-core CPU (``--size 32``, 64 U-Net channels, batch 32); the configs'
own sizes on a GPU: ``--size 64 --unet-channels 128 --batch 128 --accelerator gpu`` (scripts/emoji_gpu_recipe.sh trains
them for a budget of GPU minutes instead of steps). Everything lands in ``--out`` (default runs/demo).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("ldm.demo")


def stage(name: str, config: str, run_dir: Path, overrides: list[str]) -> Path:
    from ldm.cli.train import run  # noqa: PLC0415

    t0 = time.time()
    log.info("== %s: %s %s", name, config, " ".join(overrides))
    run(["--config", config, "--run-dir", str(run_dir), "--resume", "auto", *overrides])
    log.info("== %s done in %.0f s", name, time.time() - t0)
    return run_dir / "model.safetensors"


def cache_latents(data: Path, out: Path, a: argparse.Namespace, model: list[str]) -> Path:
    """The training and held-out images encoded once by the trained autoencoder, with their captions' token
    states (ldm/cli/cache_latents.py): the U-Net stage then runs no encoder per step. Kept while the data and the
    encoders are the same (a rerun of the demo), replaced when a stage was retrained."""
    from ldm.cli.cache_latents import main as cache_main  # noqa: PLC0415

    t0 = time.time()
    device = "cpu" if a.accelerator == "cpu" else None
    args = ["--config", "configs/emoji/unet.yaml", "--data", str(data), "--out", str(out), "--split",
            "train,heldout", "--context", "--overwrite", "--batch-size", str(max(a.batch, 64)), *model]
    if cache_main(args + (["--device", device] if device else [])) != 0:
        raise SystemExit(f"demo: caching the latents in {out} failed (see the error above)")
    log.info("== latents cached in %.0f s: %s", time.time() - t0, out)
    return out


def captions(data: Path, split: str, n: int) -> list[str]:
    from ldm.data import make_dataloader  # noqa: PLC0415

    batch = next(iter(make_dataloader(str(data), n, split=split, size=8, seed=1)))
    return list(batch["caption"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--size", type=int, default=32, help="image size in pixels")
    p.add_argument("--steps", type=int, nargs=3, default=(250, 400, 1100), metavar=("AE", "CLIP", "UNET"),
                   help="training steps of the three stages")
    p.add_argument("--unet-channels", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--accelerator", default="auto")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(a.out)
    t0 = time.time()
    from ldm.data.emoji_build import build_emoji_dataset  # noqa: PLC0415

    data = out / f"emoji{a.size}"
    build_emoji_dataset(data, size=a.size)
    common = [f"data.train={data}", f"data.size={a.size}", f"data.batch_size={a.batch}", "data.num_workers=0",
              f"trainer.accelerator={a.accelerator}", "trainer.log_every_n_steps=25"]
    if a.accelerator == "cpu" or a.size <= 32:
        common.append("trainer.precision=32-true")
    ae = stage("autoencoder", "configs/emoji/autoencoder.yaml", out / "autoencoder",
               common + [f"trainer.max_steps={a.steps[0]}", f"model.params.ddconfig.resolution={a.size}"])
    clip = stage("clip", "configs/emoji/clip.yaml", out / "clip",
                 common + [f"trainer.max_steps={a.steps[1]}", f"model.params.vision_cfg.image_size={a.size}"])
    model = [f"train.components.first_stage_model={ae}", f"train.components.cond_stage_model={clip}",
             f"model.params.image_size={a.size // 4}",
             f"model.params.unet_config.params.model_channels={a.unet_channels}"]
    latents = cache_latents(data, out / f"emoji{a.size}-latents", a, model)
    unet = stage("unet", "configs/emoji/unet.yaml", out / "unet",
                 common + model + [f"data.train={latents}", f"trainer.max_steps={a.steps[2]}",
                                   "sample.every_n_steps=0", "train.warmup_steps=100",
                                   "train.checkpoint.every_n_steps=500"])
    grid = sample_grid(unet, data, out / "grid.png")
    (out / "demo.json").write_text(json.dumps({"minutes": (time.time() - t0) / 60, "grid": str(grid)}, indent=1))
    log.info("demo finished in %.1f min: %s", (time.time() - t0) / 60, grid)
    return 0


def sample_grid(checkpoint: Path, data: Path, path: Path) -> Path:
    """Held-out prompts in the first rows, training prompts after; fixed seeds."""
    import ldm  # noqa: PLC0415
    from ldm.grid import make_grid  # noqa: PLC0415
    from ldm.pipeline_io import save_png  # noqa: PLC0415

    model = ldm.load(checkpoint, use_ema=True)
    held, train = captions(data, "heldout", 8), captions(data, "train", 8)
    images = model.generate(held + train, steps=30, guidance=4.0, seed=0, sampler="dpmpp_2m", progress=False)
    big = [im.resize((96, 96), 0) for im in images]
    labels = [f"[held-out] {c}" for c in held] + [f"[train] {c}" for c in train]
    save_png(make_grid(big, ncols=8, captions=labels, caption_chars=16), path)
    return path


if __name__ == "__main__":
    sys.exit(main())
