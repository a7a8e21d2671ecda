"""Validation: every ``train.val_every_n_steps`` steps, each stage's metrics on the same held-out batches with the
same noise, so that successive values differ only by the weights (a curve without sampling noise).

Data: ``data.val`` (any spec that ``data.train`` accepts; with a manifest, ``data.val_split`` picks the split), or
``data.val_split`` alone (another split of the training shards, e.g. the emoji set's ``heldout``). Each rank reads
its own disjoint share, ``train.val_batches`` batches (8 by default, fewer when the set is smaller), in a fixed order;
noise comes from a generator seeded by (``train.val_seed``, batch, rank). Sums are all-reduced, and rank 0 logs the
means as ``val/<metric>`` to every logger (CSV, TensorBoard, wandb) at the step.

A stage provides ``validation_metrics(batch, generator) -> {name: (B,) per-sample values}`` (see the stage modules:
diffusion ``loss`` and ``loss_ema``, autoencoder ``l1``, ``psnr``, ``kl``, CLIP ``loss``, ``acc_i2t``).
"""
from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import move_data_to_device

log = logging.getLogger(__name__)


class Validation(L.Callback):
    """Runs :meth:`validate` every ``every_n_steps`` optimizer steps and once more when training ends."""

    def __init__(self, every_n_steps: int, batches: int = 8, seed: int = 0) -> None:
        if every_n_steps <= 0 or batches <= 0:
            raise ValueError(f"train.val_every_n_steps and train.val_batches must be positive, got {every_n_steps}, "
                             f"{batches}")
        self.every, self.batches, self.seed = int(every_n_steps), int(batches), int(seed)
        self._last = -1

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every or step == self._last:
            return
        self.validate(trainer, module, step)

    def state_dict(self) -> dict[str, int]:
        """The step last validated, saved in checkpoints: a run resumed at a step that was already validated does not
        validate (and log) it again when its first batch ends."""
        return {"last": self._last}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last = int(state_dict.get("last", -1))

    def on_train_end(self, trainer: L.Trainer, module: Any) -> None:
        if trainer.global_step != self._last:
            self.validate(trainer, module, trainer.global_step)

    @torch.no_grad()
    def validate(self, trainer: L.Trainer, module: Any, step: int) -> dict[str, float]:
        """The metrics' means over every rank's validation batches, logged at ``step``; returns them."""
        self._last = step
        rank = trainer.global_rank
        sums: dict[str, torch.Tensor] = {}
        count = 0
        for i, batch in enumerate(trainer.datamodule.val_batches(rank, trainer.world_size, self.batches)):
            batch = move_data_to_device(batch, module.device)
            gen = torch.Generator(device=module.device)
            gen.manual_seed((self.seed * 1_000_003 + i * 7919 + rank * 104_729) % (2**63 - 1))
            for name, values in module.validation_metrics(batch, gen).items():  # (B,) each
                sums[name] = sums.get(name, 0) + values.detach().double().sum()
            count += len(batch["caption"])
        names = sorted(sums)
        totals = torch.stack([sums[n].to(module.device) for n in names]
                             + [torch.tensor(float(count), dtype=torch.float64, device=module.device)])
        totals = trainer.strategy.reduce(totals, reduce_op="sum").cpu()  # every rank takes part
        means = {f"val/{n}": float(totals[j] / totals[-1]) for j, n in enumerate(names)}
        for lg in trainer.loggers:
            lg.log_metrics(means, step)
        if trainer.is_global_zero:
            log.info("step %d: validation on %d samples: %s", step, int(totals[-1]),
                     ", ".join(f"{k} {v:.4g}" for k, v in means.items()))
        return means


def build_validation(cfg: Any) -> Validation | None:
    """The callback when ``train.val_every_n_steps`` is set (the datamodule then needs validation data)."""
    t = cfg.train
    every = t.get("val_every_n_steps")
    if not every:
        return None
    return Validation(int(every), int(t.get("val_batches", 8)), int(t.get("val_seed", 0)))
