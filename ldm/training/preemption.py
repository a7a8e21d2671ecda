"""SLURM pre-emption: the warning signal (``#SBATCH --signal=SIGUSR1@90``) leads to a checkpoint and a requeue.

Lightning's own handler (``SLURMEnvironment(auto_requeue=True)``) saves the checkpoint inside the signal handler,
wherever the Python code of each rank happens to be: in the middle of a training step (the data position already
counts the batch, the step and its optimizer update not yet: the resumed run skipped that batch), and, with several
ranks, at a different point on each, so the checkpoint's collectives (its barrier) could pair with another rank's
gradient all-reduce. Here the handler only notes the signal; at the end of the next batch that closes an
accumulation window, the ranks agree (a max all-reduce of the note over a gloo group, on the host, so the GPUs'
queue is not waited for) and all of them save ``<run dir>/hpc_ckpt_<N>.ckpt`` together, the state after that step;
then rank 0 asks SLURM to requeue the job (``scontrol requeue``). The requeued job resumes from it with ``--resume
auto`` (:func:`ldm.cli.train.resolve_resume` takes the last saved, by the save time recorded in them, of
``checkpoints/*.ckpt`` and the ``hpc_ckpt_*.ckpt``).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from typing import Any

import lightning as L

from ldm.training.host_vote import HostVote

log = logging.getLogger(__name__)


def slurm_detected() -> bool:
    """Whether this process is a SLURM task that Lightning treats as such (``SLURM_NTASKS`` set, not an
    interactive allocation)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment  # noqa: PLC0415

    return SLURMEnvironment.detect()


def slurm_job_id() -> str:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for a job array, else ``SLURM_JOB_ID``."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array is not None:
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


def requeue() -> bool:
    """``scontrol requeue`` this job; False (logged) when that fails."""
    job = slurm_job_id()
    try:
        result = subprocess.run(["scontrol", "requeue", job], check=False).returncode
    except FileNotFoundError:
        log.error("SLURM pre-emption: scontrol not found; job %s is not requeued (resubmit it: --resume auto "
                  "continues from the checkpoint just written)", job)
        return False
    if result != 0:
        log.error("SLURM pre-emption: scontrol requeue %s failed with exit code %d", job, result)
        return False
    log.info("SLURM pre-emption: job %s requeued", job)
    return True


class SlurmRequeue(L.Callback):
    """See the module docstring. ``signum``: the warning signal (SIGUSR1, as ``scripts/slurm_train.sbatch`` asks)."""

    def __init__(self, signum: int = signal.SIGUSR1, timeout_s: float = 600.0) -> None:
        self.signum, self.vote = signum, HostVote(timeout_s)
        self.received = False
        self._previous: Any = None

    def _note(self, signum: int, frame: Any) -> None:
        self.received = True

    def on_train_start(self, trainer: L.Trainer, module: Any) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(self.signum, self._note)
        self.vote.open(trainer)

    def on_train_end(self, trainer: L.Trainer, module: Any) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(self.signum, self._previous)
            self._previous = None

    def agreed(self, trainer: L.Trainer) -> bool:
        """Whether any rank has had the signal (every rank asks at the same batches, so all get the same answer)."""
        return self.vote.any(self.received)

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        from ldm.training.guard import accumulation  # noqa: PLC0415

        if not accumulation(module)[1] or not self.agreed(trainer):  # mid-window: the step is not taken yet
            return
        self.received = False
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            log.info("SLURM pre-emption signal: checkpoint %s at step %d", path, trainer.global_step)
            requeue()
