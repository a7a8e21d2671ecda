"""Sharded (``DTensor``) weights, as ``trainer.strategy: fsdp`` leaves them (:mod:`ldm.training.sharding`), seen as
plain tensors where an update works shard by shard."""
from __future__ import annotations

import torch


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """A ``DTensor``'s own shard on this rank (a view of its storage: in-place writes update the ``DTensor``); a
    plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t
