"""Per-step metrics without host syncs.

Lightning's ``self.log`` turns a Python number into a tensor on the module's device: a blocking host-to-device copy,
so the host waits for the GPU's whole queue. It also reads every progress-bar tensor back to the host at the end of
each step: another wait. Either stalls the host once per step, and with it the kernels it would have queued for the
next step. :func:`log_step` logs numbers as CPU tensors and device tensors to the loggers only (Lightning reads
those every ``trainer.log_every_n_steps`` steps); a progress-bar copy of a device tensor is logged only on the steps
the bar redraws (``logging.progress_every_n_steps``).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch


def bar_redraws(module: Any) -> bool:
    """Whether the progress bar redraws at the end of this batch (as TQDMProgressBar decides)."""
    trainer = module.trainer
    bar = getattr(trainer, "progress_bar_callback", None)
    rate = getattr(bar, "refresh_rate", 0) if bar is not None and getattr(bar, "is_enabled", True) else 0
    return bool(rate) and (trainer.fit_loop.epoch_loop.batch_idx + 1) % rate == 0


def log_step(module: Any, values: Mapping[str, torch.Tensor | float], bar: Iterable[str] = ()) -> None:
    """Log ``values`` (name -> tensor or number) this step; the names in ``bar`` are also shown in the progress bar,
    under their last path part (``train/loss`` -> ``loss``): numbers and CPU tensors every step (reading them costs
    nothing), device tensors on the steps the bar redraws."""
    bar = set(bar)
    redraw = None
    for name, value in values.items():
        v = value.detach() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        module.log(name, v)
        if name not in bar:
            continue
        if v.device.type != "cpu":
            redraw = bar_redraws(module) if redraw is None else redraw
        if v.device.type == "cpu" or redraw:
            module.log(name.rsplit("/", 1)[-1], v, prog_bar=True, logger=False)
