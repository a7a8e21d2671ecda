"""Room for a run's checkpoints, said at the start rather than found at the first save that fails."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def checkpoint_bytes(module: torch.nn.Module) -> int:
    """About one training checkpoint of ``module``: its state dict's tensors (frozen parts and EMA included) and
    AdamW's two fp32 moments per trainable parameter."""
    weights = sum(t.numel() * t.element_size() for t in module.state_dict().values() if torch.is_tensor(t))
    moments = sum(2 * 4 * p.numel() for p in module.parameters() if p.requires_grad)
    return weights + moments


def copies_on_disk(keep_last: int) -> int:
    """Checkpoint files a run holds at its peak: ``keep_last`` periodic ones (all of them when negative: counted as
    one here), ``last.ckpt``, and the one being written beside them."""
    return max(keep_last, 1) + 2 if keep_last != 0 else 2


def warn_if_short(folder: Path, module: torch.nn.Module, keep_last: int) -> bool:
    """Log a warning, and return True, when the file system of ``folder`` has less free space than the run's
    checkpoints will take (:func:`checkpoint_bytes` × :func:`copies_on_disk`)."""
    one, n = checkpoint_bytes(module), copies_on_disk(keep_last)
    free = shutil.disk_usage(folder).free
    if free >= one * n:
        return False
    log.warning("%s has %.2f GB free; this run's checkpoints are about %.2f GB each (weights and optimizer state) and "
                "it holds up to %d at once (train.checkpoint.keep_last=%d, last.ckpt, the one being written): %.2f GB. "
                "A save that finds the disk full stops the run (the files already written stay whole)",
                folder, free / 1e9, one / 1e9, n, keep_last, one * n / 1e9)
    return True
