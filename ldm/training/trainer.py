"""Build a Lightning ``Trainer`` from the ``trainer``, ``train`` and ``logging`` sections of a config."""
from __future__ import annotations

import logging
import math
import os
import uuid
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from ldm.registry import ConfigError
from ldm.training.optim import accumulate_batches
from ldm.training.callbacks import (MANUAL_OPTIMIZATION_WARNING, EvalModeReport, ExportOnEnd, SampleGrid, Snapshots,
                                    warnings_ignored)
from ldm.training.checkpoint_io import AtomicCheckpointIO
from ldm.training.keys import check_run_config, check_section, number, sample_prompts, wandb_on
from ldm.training.logs import ResumePoint, resumable_csv_logger, resumable_tensorboard_logger
from ldm.training.preemption import SlurmRequeue, slurm_detected
from ldm.training.sharding import FSDP, check_sharded_config, sharded_strategy
from ldm.training.step_log import LearningRates
from ldm.training.validation import build_validation

log = logging.getLogger(__name__)

SECRET_KEYS = {"api_key", "apikey", "wandb_api_key", "password", "secret", "access_token", "auth_token", "hf_token",
               "key"}
TRAINER_KEYS = {"max_steps", "max_epochs", "devices", "accelerator", "num_nodes", "strategy", "precision",
                "log_every_n_steps", "accumulate_grad_batches", "fast_dev_run", "enable_progress_bar", "deterministic",
                "benchmark", "enable_model_summary", "detect_anomaly", "sync_batchnorm",
                "max_time", "profiler"}
TRAINER_VALUES = {"max_steps": number(-1, integer=True), "max_epochs": number(-1, integer=True, null=True),
                  "num_nodes": number(1, integer=True), "log_every_n_steps": number(1, integer=True)}


def check_trainer_values(tc: dict) -> None:
    """The ``trainer`` keys whose values Lightning would take wrongly or fail on deep inside (``max_steps: abc``;
    ``2.5`` ran 3 steps), named with what they expect."""
    check_section("trainer", {k: v for k, v in tc.items() if k in TRAINER_VALUES}, TRAINER_VALUES)


# Lightning options that have no effect here, and what to use instead
NOT_HERE = {
    "limit_train_batches": "the data is one endless, exactly resumable stream (each Lightning epoch would restart it): "
                           "use trainer.max_steps or trainer.max_epochs",
    "limit_val_batches": "there is no Lightning validation loop: use train.val_batches",
    "val_check_interval": "there is no Lightning validation loop: use train.val_every_n_steps",
    "num_sanity_val_steps": "there is no Lightning validation loop (train.val_every_n_steps validates)",
    "gradient_clip_val": "the stages optimize manually: use train.grad_clip",
    "use_distributed_sampler": "the training data is not read through a sampler: ldm's loader splits it across the "
                               "ranks itself (disjoint shards per rank and worker, the same batch count on each)",
}
# weight-sharding strategies other than ``fsdp`` (ldm.training.sharding): Lightning's FSDP1 variants and DeepSpeed,
# whose wrapped modules the EMA, sample grids, exports and gradient clipping cannot read
SHARDED = ("fsdp", "deepspeed")


def check_no_secrets(cfg: DictConfig) -> None:
    """Refuse configs that carry credentials: wandb keys come from the environment (``WANDB_API_KEY``) only."""
    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if str(k).lower() in SECRET_KEYS:
                    raise ConfigError(f"config key {path}{k!s} looks like a credential; set it in the environment "
                                      "(e.g. WANDB_API_KEY), never in a config, log or checkpoint")
                walk(v, f"{path}{k}.")
    walk(OmegaConf.to_container(cfg, resolve=True), "")


def wandb_run_id(run_dir: Path, resuming: bool) -> str:
    """The W&B run id of ``run_dir``: the one saved in ``run_dir/wandb_run_id`` when resuming (so the resumed process
    logs into the same W&B run), else a new one, saved there by rank 0."""
    from lightning.pytorch.utilities import rank_zero_only  # noqa: PLC0415

    path = run_dir / "wandb_run_id"
    if resuming and path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    node = int(os.environ.get("NODE_RANK") or os.environ.get("GROUP_RANK") or 0)  # Lightning's own multi-node launch
    if rank_zero_only.rank == 0 and node == 0:  # the logger lives on global rank 0; the others' ids are never used
        path.write_text(run_id + "\n")
    return run_id


def build_loggers(cfg: DictConfig, run_dir: Path, resuming: bool = False,
                  resumed_from: ResumePoint | None = None) -> list[Any]:
    """The config's loggers. ``resuming``: the run continues from a checkpoint (the CSV log and the W&B run continue);
    ``resumed_from``: that checkpoint's step and save time, where TensorBoard hides what an interrupted run logged
    after it (:func:`ldm.training.logs.resumable_tensorboard_logger`); it implies ``resuming``."""
    resuming = resuming or resumed_from is not None
    lc = cfg.get("logging") or {}
    loggers: list[Any] = []
    if lc.get("csv", True):
        loggers.append(resumable_csv_logger(run_dir, resuming))
    if lc.get("tensorboard", True):
        loggers.append(resumable_tensorboard_logger(run_dir, resuming, resumed_from))
    wb = lc.get("wandb")
    if wandb_on(lc):
        from lightning.pytorch.loggers import WandbLogger  # noqa: PLC0415

        loggers.append(WandbLogger(project=wb.get("project", "ldm"), name=wb.get("name"), save_dir=str(run_dir),
                                   offline=wb.get("mode", "offline") == "offline", log_model=False,
                                   entity=wb.get("entity"), tags=wb.get("tags"),
                                   id=wandb_run_id(run_dir, resuming), resume="allow"))
    return loggers


class StepCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` without its warning, at every save under manual optimization, that the state
    is saved after the optimizer step: that is the state a resumed run continues from (``global_step`` already counts
    the step), so the warning would only teach users to ignore warnings."""

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        with warnings_ignored(MANUAL_OPTIMIZATION_WARNING):
            super().on_train_batch_end(*args, **kwargs)

    def on_train_end(self, trainer: Any, module: Any) -> None:
        """A run that ends between two saves (``trainer.max_steps`` not a multiple of ``every_n_steps``,
        ``trainer.max_time``) writes ``last.ckpt`` at its last step, so that ``--resume`` continues from there instead
        of redoing the steps after the last periodic save."""
        if trainer.global_step > self._last_global_step_saved:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            log.info("checkpoint %s at the last step, %d", self.last_model_path, trainer.global_step)


def build_callbacks(cfg: DictConfig, run_dir: Path) -> list[Any]:
    ck = (cfg.train.get("checkpoint") or {})
    cbs: list[Any] = [
        StepCheckpoint(dirpath=run_dir / "checkpoints", filename="step{step:08d}", auto_insert_metric_name=False,
                        every_n_train_steps=int(ck.get("every_n_steps", 500)), save_top_k=int(ck.get("keep_last", 3)),
                        monitor="step", mode="max", save_last=True),
    ]
    lc = cfg.get("logging") or {}
    if lc.get("csv", True) or lc.get("tensorboard", True) or wandb_on(lc):
        cbs.append(LearningRates())  # LearningRateMonitor's metrics, without its device tensor per log step
    sc = cfg.get("sample") or {}
    if sc.get("every_n_steps") and cfg.train.get("stage", "diffusion") == "diffusion":
        cbs.append(SampleGrid(run_dir / "samples", sample_prompts(sc), int(sc.every_n_steps),
                              seed=int(sc.get("seed", 0)), steps=int(sc.get("steps", 20)),
                              sampler=sc.get("sampler", "dpmpp_2m"),
                              guidance=float(sc.get("guidance", 5.0))))
    if cfg.train.get("snapshot_every_min"):
        cbs.append(Snapshots(run_dir / "snapshots", float(cfg.train.snapshot_every_min),
                             timeout_s=float(cfg.train.get("dist_timeout_s", 600))))
    val = build_validation(cfg)
    if val is not None:
        cbs.append(val)
    cbs.append(ExportOnEnd(run_dir / "model.safetensors"))
    cbs.append(EvalModeReport())
    return cbs


def check_strategy(name: Any, cfg: DictConfig) -> None:
    """``trainer.strategy: fsdp`` with what it combines with (:func:`ldm.training.sharding.check_sharded_config`);
    the other weight-sharding strategies (:data:`SHARDED`) are refused."""
    if name == FSDP:
        check_sharded_config(cfg)
    elif isinstance(name, str) and name.lower().startswith(SHARDED):
        raise ConfigError(f"trainer.strategy={name!r} is not supported: use fsdp (the U-Net sharded with PyTorch's "
                          "FSDP2; the autoencoder and text encoder whole on every rank) or ddp (every rank holds the "
                          "whole model, with train.gradient_checkpointing, bf16 precision or train.lora to fit it)")


# DDP's gradients as views into its all-reduce buckets: no second copy of every gradient (SD-1.5's U-Net: 3.4 GB of
# fp32 per GPU) and no copy between the two after each reduction; scripts/bench_ddp.py measures DDP so
DDP_KWARGS = {"gradient_as_bucket_view": True}


def build_strategy(name: Any, timeout_s: float) -> Any:
    """DDP with a bounded collective timeout: a rank that dies or hangs makes the others fail within ``timeout_s``
    (``train.dist_timeout_s``) instead of waiting forever; Lightning then stops every process with a non-zero exit.
    ``fsdp``: :func:`ldm.training.sharding.sharded_strategy`, bounded the same way."""
    if name == FSDP:
        return sharded_strategy(timeout_s)
    if name not in ("ddp", "ddp_find_unused_parameters_true"):
        return name
    from datetime import timedelta  # noqa: PLC0415

    from lightning.pytorch.strategies import DDPStrategy  # noqa: PLC0415

    return DDPStrategy(timeout=timedelta(seconds=timeout_s), find_unused_parameters=name.endswith("_true"))


def build_trainer(cfg: DictConfig, run_dir: str | Path, callbacks: list[Any] | None = None,
                  resuming: bool = False, resumed_from: ResumePoint | None = None) -> L.Trainer:
    """The ``trainer`` section passes through to ``lightning.Trainer`` (unknown keys fail, named); ``callbacks`` are
    added to the ones the config asks for (benchmarks, tests); ``resuming``: the run continues from a checkpoint
    (its W&B run and its CSV log continue too), ``resumed_from``: that checkpoint's step and save time
    (:func:`build_loggers`)."""
    run_dir = Path(run_dir)
    check_no_secrets(cfg)
    tc = OmegaConf.to_container(cfg.get("trainer") or OmegaConf.create({}), resolve=True)
    check_run_config(cfg)
    for key in sorted(set(tc) & set(NOT_HERE)):
        raise ConfigError(f"trainer.{key} is not supported: {NOT_HERE[key]}")
    unknown = set(tc) - TRAINER_KEYS
    if unknown:
        raise ConfigError(f"trainer: unknown key(s) {sorted(unknown)}; allowed: {', '.join(sorted(TRAINER_KEYS))}")
    check_trainer_values(tc)
    check_strategy(tc.get("strategy", "auto"), cfg)
    tc.setdefault("log_every_n_steps", 10)
    tc.pop("accumulate_grad_batches", None)  # applied by the stages' guarded_step (manual optimization)
    try:
        accumulate_batches(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    strategy = tc.get("strategy", "auto")
    if strategy == "ddp" and cfg.train.get("stage") == "autoencoder":
        strategy = "ddp_find_unused_parameters_true"  # the generator step leaves the discriminator without grads
    timeout_s = float(cfg.train.get("dist_timeout_s", 600))
    tc["strategy"] = build_strategy(strategy, timeout_s)
    callbacks = build_callbacks(cfg, run_dir) + list(callbacks or [])
    if tc.get("enable_progress_bar", True):
        callbacks.append(progress_bar(cfg))
    plugins: list[Any] = [AtomicCheckpointIO()]
    if slurm_detected():  # our requeue handler instead of Lightning's, which saves in the middle of a step
        from lightning.pytorch.plugins.environments import SLURMEnvironment  # noqa: PLC0415

        plugins.append(SLURMEnvironment(auto_requeue=False))
        callbacks.append(SlurmRequeue(timeout_s=timeout_s))
    trainer = L.Trainer(default_root_dir=str(run_dir), logger=build_loggers(cfg, run_dir, resuming, resumed_from),
                        callbacks=callbacks, plugins=plugins, **tc)
    configure_ddp(trainer, timeout_s)
    return trainer


def configure_ddp(trainer: L.Trainer, timeout_s: float) -> None:
    """:data:`DDP_KWARGS` on the trainer's DDP, ours (:func:`build_strategy`) or one Lightning chose itself
    (``strategy: auto`` with several devices, ``ddp_spawn``, ``ddp_fork``); on the latter also
    ``train.dist_timeout_s``, without which its collectives would wait Lightning's default (30 minutes) for a dead
    rank."""
    from datetime import timedelta  # noqa: PLC0415

    from lightning.pytorch.strategies import DDPStrategy  # noqa: PLC0415

    if isinstance(trainer.strategy, DDPStrategy):
        trainer.strategy._timeout = timedelta(seconds=timeout_s)  # read when the process group is created (setup)
        for key, value in DDP_KWARGS.items():  # read when the model is wrapped (setup)
            trainer.strategy._ddp_kwargs.setdefault(key, value)


def epochs_as_steps(trainer: L.Trainer, cfg: DictConfig, batches_per_epoch: int) -> None:
    """``trainer.max_epochs`` as optimizer steps: the stages read one endless stream of epochs (exact resume, workers
    that stay up), which Lightning's epoch counter never sees end, so E epochs of ``batches_per_epoch`` batches (the
    same on every rank) become ⌈E · batches / accumulate_grad_batches⌉ steps, or ``trainer.max_steps`` when that
    comes first. Neither limit (nor ``fast_dev_run``) is refused."""
    tc = cfg.get("trainer") or {}
    epochs = tc.get("max_epochs")
    if epochs in (None, -1):
        if tc.get("max_steps", -1) in (-1, None) and not tc.get("fast_dev_run"):
            raise ConfigError("trainer: set trainer.max_steps or trainer.max_epochs (the training data is an "
                              "endless stream of epochs, so without either the run would never end)")
        return
    steps = math.ceil(int(epochs) * batches_per_epoch / accumulate_batches(cfg))
    given = trainer.max_steps
    trainer.fit_loop.epoch_loop.max_steps = steps if given in (-1, None) else min(given, steps)
    log.info("trainer.max_epochs=%s: %d batches per epoch per rank -> max_steps %d", epochs, batches_per_epoch,
             trainer.max_steps)


def progress_bar(cfg: DictConfig) -> Any:
    """The progress bar, redrawn every ``logging.progress_every_n_steps`` steps (default 10): each redraw starts the
    loss on its way to the host (``ldm.training.step_log``), shown once it has arrived."""
    from lightning.pytorch.callbacks import TQDMProgressBar  # noqa: PLC0415

    every = (cfg.get("logging") or {}).get("progress_every_n_steps", 10)
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ConfigError(f"logging.progress_every_n_steps must be a positive integer, got {every!r}")
    return TQDMProgressBar(refresh_rate=every)
