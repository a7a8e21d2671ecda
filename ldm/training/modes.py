"""Train/eval modes around evaluation inside a training run."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """``module`` in eval mode inside the block, and after it every submodule back in its own mode: a frozen part
    (the U-Net stage's autoencoder) stays in eval, where ``module.train()`` would have switched it to training."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
