"""Callbacks: sample a fixed prompt list from the EMA weights every N steps; export the final model."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch

from ldm.grid import make_grid

log = logging.getLogger(__name__)


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` optimizer steps, rank 0 samples ``prompts`` with fixed seeds from the EMA weights
    and saves a captioned grid to ``out_dir/step_XXXXXXXX.png`` (and to TensorBoard when that logger is used)."""

    def __init__(self, out_dir: str | Path, prompts: Sequence[str], every_n_steps: int, seed: int = 0,
                 steps: int = 20, sampler: str = "dpmpp_2m", guidance: float = 5.0) -> None:
        self.out_dir, self.prompts, self.every = Path(out_dir), list(prompts), int(every_n_steps)
        self.kw = dict(seed=seed, steps=steps, sampler=sampler, guidance=guidance)
        self._last = -1

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every <= 0 or step == 0 or step % self.every or step == self._last:
            return
        self._last = step
        if trainer.is_global_zero:
            self.sample(trainer, module, step)

    def on_train_end(self, trainer: L.Trainer, module: Any) -> None:
        if trainer.is_global_zero and self.every > 0 and trainer.global_step != self._last:
            self.sample(trainer, module, trainer.global_step)

    @torch.no_grad()
    def sample(self, trainer: L.Trainer, module: Any, step: int) -> Path:
        net = module.net
        was_training = net.training
        net.eval()
        ema = module.model_ema
        ctx = ema.swapped_into(net.model) if ema is not None else _null()
        with ctx:
            images = net.generate(self.prompts, progress=False, **self.kw)
        net.train(was_training)
        grid = make_grid(images, captions=self.prompts)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"step_{step:08d}.png"
        grid.save(path)
        for lg in trainer.loggers:
            exp = getattr(lg, "experiment", None)
            if hasattr(exp, "add_image"):
                exp.add_image("samples", np.asarray(grid).transpose(2, 0, 1), step)
        log.info("step %d: sample grid %s", step, path)
        return path


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


class ExportOnEnd(L.Callback):
    """Rank 0 writes ``path`` (safetensors + config) through ``module.export`` when training ends."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_train_end(self, trainer: L.Trainer, module: Any) -> None:
        if trainer.is_global_zero:
            out = module.export(str(self.path))
            log.info("exported %s", out)
