"""Lightning checkpoint I/O that never leaves a half-written file: temp file in the same folder, fsync, rename."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ldm.checkpoint import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """``trainer.save_checkpoint`` through :func:`ldm.checkpoint.atomic_write`; loads use ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> dict:
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)
