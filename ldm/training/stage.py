"""What every training stage saves for an exact resume, in one place."""
from __future__ import annotations

import logging
import time
from typing import Any

from omegaconf import OmegaConf

from ldm.training.step_log import batches_per_step, write_logs

log = logging.getLogger(__name__)

SAVED_AT = "ldm_saved_at"  # the checkpoint's save time (Unix seconds), which --resume auto orders by


def data_layout(module: Any) -> dict[str, int]:
    """How the data position ``batches_seen`` (batches per rank) is counted: the ranks and the batch size."""
    trainer = getattr(module, "_trainer", None)
    world = int(trainer.world_size) if trainer is not None else 1
    return {"world_size": world, "batch_size": int(module.config.data.batch_size)}


def train_section(cfg: Any, key: str) -> Any:
    """``train.<key>`` of a config as plain Python (None where absent)."""
    value = (cfg.get("train") or {}).get(key) if cfg is not None else None
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def check_same_setting(saved: Any, now: Any, key: str, keep: str, normalize: Any = lambda v: v or None) -> None:
    """A resume must keep ``train.<key>`` (``normalize``: the value that means the same, e.g. no LoRA for rank 0);
    ``keep`` says what to keep, in the error naming both values."""
    theirs, ours = normalize(train_section(saved, key)), normalize(train_section(now, key))
    if theirs != ours:
        from ldm.registry import ConfigError  # noqa: PLC0415

        raise ConfigError(f"--resume: train.{key} is {ours} but the checkpoint was trained with {theirs}; resume with "
                          f"{keep}")


def check_same_adapters(saved: Any, now: Any) -> None:
    """A resume must keep ``train.lora`` (rank, alpha, targets): alpha sets the adapters' scale α / r, which the saved
    weights do not carry, so another alpha would silently rescale what was trained; another rank or targets would
    fail later on the state dict's shapes without naming the key."""
    check_same_setting(saved, now, "lora", "the same rank, alpha and targets (or start a new run from its weights with "
                       "train.init_checkpoint)",
                       lambda v: v if isinstance(v, dict) and int(v.get("rank") or 0) > 0 else {})  # rank 0: none


def check_same_inversion(saved: Any, now: Any) -> None:
    """A resume must keep ``train.textual_inversion``: another word, vector count or template would load the saved
    vectors into another shape, or train them on other captions."""
    check_same_setting(saved, now, "textual_inversion", "the same settings (or start a new run)")


RESTORED_KEYS = ("lr", "lr_scale", "lr_base_batch", "warmup_steps", "weight_decay", "betas", "eps", "ema_decay",
                 "text_encoder_lr", "disc_lr_mult")  # train.* that the checkpoint's optimizer, schedule and EMA fix


def check_restored_settings(saved: Any, now: Any) -> None:
    """A resume restores the optimizer (its learning rates, betas, eps, weight decay), the LR schedule and the
    EMA's decay from the checkpoint: a changed ``train.<key>`` of :data:`RESTORED_KEYS` would be silently
    ignored while the run's config.yaml said otherwise, so it is refused, naming each key. A key set on one side
    only is not compared (its default is the stage's)."""
    changed = [f"train.{k} is {ours} but the checkpoint was trained with {theirs}" for k in RESTORED_KEYS
               if (theirs := train_section(saved, k)) is not None and (ours := train_section(now, k)) is not None
               and theirs != ours]
    if changed:
        from ldm.registry import ConfigError  # noqa: PLC0415

        raise ConfigError(f"--resume: {'; '.join(changed)}. The checkpoint's optimizer, LR schedule and EMA carry "
                          "the values they were trained with: resume with those, or start a new run from its weights "
                          "(train.init_checkpoint for the U-Net)")


def window_start(module: Any) -> int:
    """The data position a checkpoint saves: ``module.batches_seen`` at the start of its current accumulation window
    (``trainer.accumulate_grad_batches``: k batches per optimizer step). The weights and optimizer in a checkpoint
    are those after the last whole window; the gradients of a window's first batches are not saved. A run that
    stops inside a window (``trainer.max_time``, a callback's ``should_stop``), whose last checkpoint is written at
    the end of training, so resumes with the whole window again (the same batches and draws), not with its last
    batches alone as a smaller step."""
    return int(module.batches_seen) - int(module.batches_seen) % batches_per_step(module)


class ResumableStage:
    """Mixin for the stage LightningModules (put it before ``L.LightningModule``).

    Expects ``self.config`` (omegaconf), ``self.guard`` (:class:`ldm.training.guard.StepGuard`) and
    ``self.batches_seen`` (the data position the datamodule restarts from).
    """

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ldm_config"] = OmegaConf.to_yaml(self.config, resolve=True)
        checkpoint["step_guard"] = self.guard.state_dict()
        checkpoint["batches_seen"] = window_start(self)
        checkpoint["data_layout"] = data_layout(self)
        checkpoint[SAVED_AT] = time.time()  # inside the file: it survives copies, which file times do not
        write_logs(self, wait=True)  # the log steps' metrics still on their way, before the checkpoint marks them

    def on_train_end(self) -> None:
        self.guard.flush(self.global_step)  # skips still counted on the device (fused optimizers) are reported
        write_logs(self, wait=True)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = OmegaConf.create(checkpoint.get("ldm_config") or "{}")
        ours, theirs = self.config.train.get("stage", "diffusion"), (saved.get("train") or {}).get("stage")
        if "step_guard" not in checkpoint or theirs != ours:
            from ldm.registry import ConfigError  # noqa: PLC0415

            raise ConfigError(f"--resume: the checkpoint is not one of a train.stage={ours} run (its stage: "
                              f"{theirs or 'unknown, not written by ldm-train'})")
        check_same_adapters(saved, self.config)
        check_same_inversion(saved, self.config)
        check_restored_settings(saved, self.config)
        self.guard.load_state_dict(checkpoint["step_guard"])
        self.batches_seen = int(checkpoint["batches_seen"])
        saved, now = checkpoint.get("data_layout"), data_layout(self)
        if saved is not None and saved != now:
            log.warning("--resume: the checkpoint counted its data position (%d batches per rank) with world_size=%d "
                        "and data.batch_size=%d, this run has world_size=%d and data.batch_size=%d: the data does not "
                        "continue where it stopped (epochs are dealt anew; samples may be seen twice or skipped)",
                        self.batches_seen, saved["world_size"], saved["batch_size"], now["world_size"],
                        now["batch_size"])
