"""What every training stage saves for an exact resume, in one place."""
from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from ldm.training.step_log import write_logs


class ResumableStage:
    """Mixin for the stage LightningModules (put it before ``L.LightningModule``).

    Expects ``self.config`` (omegaconf), ``self.guard`` (:class:`ldm.training.guard.StepGuard`) and
    ``self.batches_seen`` (the data position the datamodule restarts from).
    """

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ldm_config"] = OmegaConf.to_yaml(self.config, resolve=True)
        checkpoint["step_guard"] = self.guard.state_dict()
        checkpoint["batches_seen"] = self.batches_seen
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
        self.guard.load_state_dict(checkpoint["step_guard"])
        self.batches_seen = int(checkpoint["batches_seen"])
