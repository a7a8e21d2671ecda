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

from ldm.training.logs import ResumePoint

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
    p.add_argument("--resume", default=None, help="'auto' (the last saved, by the save time recorded in them, of "
                   "checkpoints/*.ckpt and the SLURM pre-emption checkpoints hpc_ckpt_<N>.ckpt in the run dir, if "
                   "any) or a .ckpt path")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p.parse_intermixed_args(argv)  # overrides may come before or after the options


def checkpoint_candidates(run_dir: Path) -> list[Path]:
    """The training checkpoints of a run folder: ``checkpoints/*.ckpt`` (``last.ckpt``, the periodic
    ``step%08d.ckpt``, their ``-v<N>`` versions) and the SLURM pre-emption checkpoints ``hpc_ckpt_<N>.ckpt``
    (:mod:`ldm.training.preemption`). ``atomic_write``'s temporary files end in ``.tmp`` and are not among them."""
    found = [*(run_dir / "checkpoints").glob("*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]
    return sorted(p for p in found if p.is_file())


def checkpoint_progress(path: Path, given: bool = False) -> tuple[bool, float, int, int]:
    """How recent a training checkpoint is, as :func:`latest_checkpoint` orders them: ``(has a save time, the save
    time recorded in it, global_step, batches_seen)``; a checkpoint of an ldm without the save time (or without
    ``batches_seen``) has False and 0.0 (-1).

    Read with ``torch.load(weights_only=True)`` (a pickle that asks to build anything but tensors and plain containers
    is refused, as the resume itself refuses it) and, for the zip format ``torch.save`` writes, ``mmap=True``: the
    tensors stay on disk, only the pickled structure is read. A file that cannot be read, or has no ``global_step``
    (not a Lightning checkpoint), raises :class:`ldm.checkpoint.CheckpointError` naming it, worded for a file
    ``--resume auto`` found in the run folder or, with ``given``, one that ``--resume PATH`` named."""
    import pickle  # noqa: PLC0415
    import zipfile  # noqa: PLC0415

    import torch  # noqa: PLC0415

    from ldm.checkpoint import CheckpointError, refusal  # noqa: PLC0415
    from ldm.training.stage import SAVED_AT  # noqa: PLC0415

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # zip or pickle errors, a refused global, I/O: all mean the step cannot be known
        why = refusal(e) if isinstance(e, pickle.UnpicklingError) else (str(e).splitlines() or [""])[0]
        why = f"{type(e).__name__}{': ' + why if why else ''}"
        if given:
            raise CheckpointError(f"--resume {path}: not a readable training checkpoint ({why})") from e
        raise CheckpointError(f"--resume auto: cannot read the training step of {path} ({why}); it may be the "
                              "latest checkpoint (a copy not yet complete?): repair or move it away, or pass "
                              "--resume <path> of the checkpoint to continue from") from e
    step = ckpt.get("global_step") if isinstance(ckpt, dict) else None
    if not isinstance(step, int):
        if given:
            raise CheckpointError(f"--resume {path}: has no global_step: not a training checkpoint of ldm-train (an "
                                  "original SD .ckpt or another program's?); to start from its weights use "
                                  "train.init_checkpoint")
        raise CheckpointError(f"--resume auto: {path} has no global_step: not a training checkpoint of ldm-train; "
                              "move it out of the run folder, or pass --resume <path> of the checkpoint to continue "
                              "from")
    seen, saved = ckpt.get("batches_seen"), ckpt.get(SAVED_AT)
    timed = isinstance(saved, (int, float)) and not isinstance(saved, bool)
    return timed, float(saved) if timed else 0.0, step, seen if isinstance(seen, int) else -1


def tie_rank(path: Path) -> tuple[int, int, str]:
    """Which of several checkpoints at one training step ``--resume auto`` takes (the greatest): ``last.ckpt``, whose
    callback state knows the periodic file saved with it; then ``last-v<N>.ckpt``, then the pre-emption checkpoints
    (the greatest ``N`` of ``hpc_ckpt_<N>``), then the others by name. File times play no part."""
    name, stem = path.name, path.stem
    if name == "last.ckpt":
        return 3, 0, name
    number = stem.rpartition("-v" if stem.startswith("last-v") else "_")[2]
    if stem.startswith("last-v") and number.isdigit():
        return 2, int(number), name
    if stem.startswith("hpc_ckpt_") and number.isdigit():
        return 1, int(number), name
    return 0, 0, name


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The run folder's latest checkpoint (:func:`checkpoint_candidates`), or None when there is none: the last
    saved, by the save time recorded inside each (``ldm_saved_at``), then the greatest ``global_step``, then
    ``batches_seen`` (the data position: ahead of the step inside an accumulation window, after a stop mid-window),
    then :func:`tie_rank`; checkpoints of an ldm that recorded no save time come after those that do, by step. Not
    the files' modification times, which a copy of the run folder (``cp -r``, ``rsync`` without ``-t``, a download)
    rewrites; not the step first, which would take an abandoned branch after a deliberate ``--resume`` from an
    earlier checkpoint (its files stay, and the new branch's steps are lower). A requeued job continues from its
    pre-emption checkpoint, saved after the last periodic one. A file that cannot be read stops the choice with a
    :class:`ldm.checkpoint.CheckpointError` naming it (it might be the latest one: resuming from an older checkpoint
    would redo steps, then overwrite it)."""
    found = checkpoint_candidates(run_dir)
    if not found:
        return None
    progress = {p: checkpoint_progress(p) for p in found}
    best = max(found, key=lambda p: (*progress[p], tie_rank(p)))
    log.info("--resume auto: %s (step %d) of %s", best, progress[best][2],
             ", ".join(f"{p.name}: step {progress[p][2]}" for p in found))
    return best


def resolve_resume(resume: str | None, run_dir: Path) -> str | None:
    """The checkpoint ``--resume`` names: None without it, :func:`latest_checkpoint` for ``auto`` (None in a run
    folder without checkpoints: a new run), else the path given, which must be an existing, readable ``.ckpt``."""
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
    checkpoint_progress(Path(resume), given=True)  # read now (its structure only): a truncated, refused or foreign
    # file is one line naming it, not a traceback from inside fit
    return resume


def lightning_resume_path(run_dir: Path) -> Path | None:
    """The checkpoint ``trainer.fit`` given none restores all the same: under SLURM, Lightning continues from the run
    folder's pre-emption checkpoint ``hpc_ckpt_<N>.ckpt`` of the greatest N by itself; None elsewhere."""
    from ldm.training.preemption import slurm_detected  # noqa: PLC0415

    numbers = [int(n) for n in (p.stem.removeprefix("hpc_ckpt_") for p in run_dir.glob("hpc_ckpt_*.ckpt"))
               if n.isdigit()]
    return run_dir / f"hpc_ckpt_{max(numbers)}.ckpt" if numbers and slurm_detected() else None


def restored_checkpoint(ckpt: str | None, run_dir: Path) -> Path | None:
    """The checkpoint the run continues from: ``ckpt`` (``--resume``) or, without one, the one ``trainer.fit``
    restores by itself under SLURM (:func:`lightning_resume_path`); None for a new run."""
    return Path(ckpt) if ckpt else lightning_resume_path(run_dir)


def resume_point(path: Path | None) -> ResumePoint | None:
    """Where the run continues, for its logs (TensorBoard hides what an interrupted run logged after it): the step and
    save time of the checkpoint at ``path`` (:func:`restored_checkpoint`), read by :func:`checkpoint_progress`; None
    for a new run, or where the step cannot be read (the resume itself then says why)."""
    from ldm.checkpoint import CheckpointError  # noqa: PLC0415

    if path is None:
        return None
    try:
        timed, saved, step, _ = checkpoint_progress(path)
    except CheckpointError:
        return None
    return ResumePoint(step, saved if timed else None)


def run(argv: list[str] | None = None, callbacks: list[Any] | None = None) -> Any:
    """Train as ``scripts/train.py`` does with ``argv``; ``callbacks`` join the config's. Returns the Trainer."""
    import lightning as L  # noqa: PLC0415

    from ldm.config import find_config, load_config, to_yaml  # noqa: PLC0415
    from ldm.training.callbacks import WriteConfig, expected_warnings_quiet  # noqa: PLC0415
    from ldm.training.datamodule import build_datamodule  # noqa: PLC0415
    from ldm.training.disk import warn_if_short  # noqa: PLC0415
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
    restored = restored_checkpoint(ckpt, run_dir)
    resuming = restored is not None  # the CSV log and the W&B run continue, or start afresh
    callbacks = [*(callbacks or []), WriteConfig(run_dir / "config.yaml", to_yaml(cfg))]  # once training starts
    trainer = build_trainer(cfg, run_dir, callbacks, resuming=resuming, resumed_from=resume_point(restored))
    module = stage_module(cfg)
    if trainer.is_global_zero:
        warn_if_short(run_dir, module, trainer.checkpoint_callback.save_top_k)  # train.checkpoint.keep_last
    epochs_as_steps(trainer, cfg, dm.batches_per_epoch(trainer.num_devices * trainer.num_nodes))
    if ckpt:
        log.info("resuming from %s", ckpt)
    try:
        with expected_warnings_quiet(resuming=resuming):  # EvalModeReport says which modules are in eval mode
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
