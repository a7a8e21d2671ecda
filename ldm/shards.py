"""Sharded (``DTensor``) weights, as ``trainer.strategy: fsdp`` leaves them (:mod:`ldm.training.sharding`), seen as
plain tensors where an update works shard by shard."""
from __future__ import annotations

import torch


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (spread over a device mesh) rather than a plain tensor."""
    return hasattr(t, "device_mesh")


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """A ``DTensor``'s own shard on this rank (a view of its storage: in-place writes update the ``DTensor``); a
    plain tensor as it is."""
    return t.to_local() if is_sharded(t) else t


def gathered(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a ``DTensor`` (a collective: every rank calls it, in the same order); a plain tensor as
    it is."""
    return t.full_tensor() if is_sharded(t) else t
