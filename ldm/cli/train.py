"""``ldm-train`` / ``python scripts/train.py``: train any stage from a YAML config.

    python scripts/train.py --config configs/emoji/unet.yaml trainer.max_steps=2000 data.batch_size=64
    python scripts/train.py --config configs/emoji/unet.yaml --resume auto      # continue from last.ckpt
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

log = logging.getLogger("ldm.train")

STAGES = {
    "diffusion": "ldm.diffusion.lightning:LatentDiffusionModule",
    "autoencoder": "ldm.autoencoder.lightning:AutoencoderModule",
    "clip": "ldm.conditioning.lightning:CLIPModule",
}


def stage_module(cfg: DictConfig) -> Any:
    import importlib  # noqa: PLC0415

    stage = cfg.train.get("stage", "diffusion")
    if stage not in STAGES:
        raise ValueError(f"train.stage must be one of {', '.join(STAGES)}, got {stage!r}")
    mod, attr = STAGES[stage].split(":")
    return getattr(importlib.import_module(mod), attr)(cfg)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (path, or a name under configs/)")
    p.add_argument("--run-dir", default=None, help="output folder (default runs/<config name>)")
    p.add_argument("--resume", default=None, help="'auto' (the newest of checkpoints/last.ckpt and a SLURM "
                   "pre-emption checkpoint hpc_ckpt_<N>.ckpt in the run dir, if any) or a .ckpt path")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p.parse_intermixed_args(argv)  # overrides may come before or after the options


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest (last written) of ``run_dir/checkpoints/last.ckpt`` and the SLURM pre-emption checkpoints
    ``run_dir/hpc_ckpt_<N>.ckpt`` (:mod:`ldm.training.preemption`), or None when there is none. A requeued job
    continues from the pre-emption checkpoint, written after the last periodic one."""
    found = [p for p in [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def resolve_resume(resume: str | None, run_dir: Path) -> str | None:
    if resume is None:
        return None
    if resume == "auto":
        latest = latest_checkpoint(run_dir)
        return str(latest) if latest is not None else None
    if not Path(resume).is_file():
        raise FileNotFoundError(f"--resume: checkpoint {resume!r} not found")
    if Path(resume).suffix != ".ckpt":
        raise ValueError(f"--resume {resume}: expected a training checkpoint (checkpoints/*.ckpt of a run); to start a "
                         "new run from an exported model, use train.init_checkpoint (diffusion) or train.components")
    return resume


def run(argv: list[str] | None = None, callbacks: list[Any] | None = None) -> Any:
    """Train as ``scripts/train.py`` does with ``argv``; ``callbacks`` join the config's. Returns the Trainer."""
    import lightning as L  # noqa: PLC0415

    from ldm.config import find_config, load_config, to_yaml  # noqa: PLC0415
    from ldm.training.callbacks import expected_warnings_quiet  # noqa: PLC0415
    from ldm.training.datamodule import build_datamodule  # noqa: PLC0415
    from ldm.training.keys import check_run_config  # noqa: PLC0415
    from ldm.training.trainer import build_trainer, epochs_as_steps  # noqa: PLC0415

    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir or Path("runs") / find_config(args.config).stem)
    run_dir.mkdir(parents=True, exist_ok=True)
    check_run_config(cfg)  # every section's keys and values, then the data, before a model is built
    dm = build_datamodule(cfg)
    L.seed_everything(int(cfg.train.get("seed", 0)), workers=True, verbose=False)  # identical init on every rank
    ckpt = resolve_resume(args.resume, run_dir)
    trainer = build_trainer(cfg, run_dir, callbacks, resuming=bool(ckpt))
    if trainer.is_global_zero:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    module = stage_module(cfg)
    epochs_as_steps(trainer, cfg, dm.batches_per_epoch(trainer.num_devices * trainer.num_nodes))
    if ckpt:
        log.info("resuming from %s", ckpt)
    try:
        with expected_warnings_quiet(resuming=bool(ckpt)):  # EvalModeReport says which modules are in eval mode
            trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    except KeyError as e:  # Lightning reads its own keys first: a foreign .ckpt fails there
        if ckpt and "pytorch-lightning_version" in str(e):
            raise ValueError(f"--resume {ckpt}: not a training checkpoint of ldm-train (an original SD .ckpt or "
                             "another program's?); to start from its weights use train.init_checkpoint") from None
        raise
    return trainer


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from lightning.fabric.utilities.exceptions import MisconfigurationException  # noqa: PLC0415

    from ldm.checkpoint import CheckpointError  # noqa: PLC0415

    try:
        run(argv)
    except (ValueError, FileNotFoundError, KeyError, CheckpointError, MisconfigurationException) as e:
        log.error("%s", e)  # the messages name the key, file or argument; a traceback would bury them
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
