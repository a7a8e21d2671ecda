"""Decisions the ranks must take together, taken on the host without waiting for the GPUs.

Some callbacks act on something only one process sees: a signal (SLURM's pre-emption warning), or a wall clock
(snapshots every N minutes). When the action is a collective (a checkpoint's gather, an fsdp export), every rank
must take it at the same batch, or one rank's gather pairs with another's training all-gather and the job hangs or
mixes data. :class:`HostVote` makes the ranks agree: a max all-reduce of one integer over a gloo process group, on
the host, so the GPUs' queue is not waited for (an NCCL collective would need the value back on the host, a sync
per step). Every rank must ask at the same batches; one rank's True is everyone's.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch


class HostVote:
    """A gloo group for flags agreed on the host. ``open`` at the start of training (a collective: every rank, in the
    same order), then ``any(flag)`` at the same batches on every rank. With one process it returns the flag."""

    def __init__(self, timeout_s: float = 600.0) -> None:
        self.timeout_s = float(timeout_s)
        self._group: Any = None

    def open(self, trainer: Any) -> None:
        """The group, when ``trainer`` runs several processes in an initialized process group."""
        if self._group is None and trainer.world_size > 1 and torch.distributed.is_available() \
                and torch.distributed.is_initialized():
            self._group = torch.distributed.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout_s))

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is True on any rank."""
        if self._group is None:
            return bool(flag)
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self._group)
        return bool(t.item())
