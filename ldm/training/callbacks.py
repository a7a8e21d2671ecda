"""Callbacks: sample a fixed prompt list from the EMA weights every N steps; export the final model; export
snapshots every N minutes (for curves of a metric against training time)."""
from __future__ import annotations

import json
import logging
import time
import warnings
from collections import Counter
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, ContextManager, Iterator, Sequence

import lightning as L
import numpy as np
import torch

from ldm.grid import make_grid
from ldm.pipeline_io import save_png
from ldm.training.modes import eval_mode
from ldm.training.host_vote import HostVote
from ldm.training.sharding import is_sharding, joins

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
        if joins(trainer, module):
            self.sample(trainer, module, step, write=trainer.is_global_zero)

    def on_train_end(self, trainer: L.Trainer, module: Any) -> None:
        if joins(trainer, module) and self.every > 0 and trainer.global_step != self._last:
            self.sample(trainer, module, trainer.global_step, write=trainer.is_global_zero)

    @torch.no_grad()
    def sample(self, trainer: L.Trainer, module: Any, step: int, write: bool = True) -> Path | None:
        """The grid of ``step``, saved when ``write`` (rank 0; under ``trainer.strategy: fsdp`` every rank samples,
        their sharded blocks gathering together, and the others write nothing)."""
        net = module.net
        ema = module.model_ema
        ctx = ema.swapped_into(net.model) if ema is not None else nullcontext()
        with eval_mode(net), ctx:
            images = net.generate(self.prompts, progress=False, **self.kw)
        if not write:
            return None
        grid = make_grid(images, captions=self.prompts)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"step_{step:08d}.png"
        save_png(grid, path)
        for lg in trainer.loggers:
            exp = getattr(lg, "experiment", None)
            if hasattr(exp, "add_image"):
                exp.add_image("samples", np.asarray(grid).transpose(2, 0, 1), step)
        log.info("step %d: sample grid %s", step, path)
        return path


class ExportOnEnd(L.Callback):
    """Rank 0 writes ``path`` (safetensors + config) through ``module.export`` when training ends."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_train_end(self, trainer: L.Trainer, module: Any) -> None:
        if joins(trainer, module):  # fsdp: every rank gathers, rank 0 writes
            out = module.export(str(self.path))
            if trainer.is_global_zero:
                log.info("exported %s", out)


class WriteConfig(L.Callback):
    """Rank 0 writes the run's config (``text``) to ``path`` once training starts: after the model is built and a
    resumed checkpoint is accepted, so a run refused at start-up leaves the folder's earlier config, which matches
    its checkpoints, in place (a temporary file renamed over it: never half-written)."""

    def __init__(self, path: str | Path, text: str) -> None:
        self.path, self.text = Path(path), text

    def on_train_start(self, trainer: L.Trainer, module: Any) -> None:
        from ldm.checkpoint import atomic_write  # noqa: PLC0415

        if trainer.is_global_zero:
            atomic_write(self.path, lambda tmp: Path(tmp).write_text(self.text))


class Snapshots(L.Callback):
    """Every ``every_min`` minutes of training (wall clock from the start of fit in this process), rank 0 exports the
    model (EMA weights when kept) to ``out_dir/step_XXXXXXXX/model.safetensors`` and appends
    ``{"step", "train_s", "images", "path"}`` to ``out_dir/index.jsonl``: the points of a metric-vs-time curve
    (``scripts/evaluate.py --snapshots``). A final snapshot is written when training ends.

    Under ``trainer.strategy: fsdp`` every rank gathers the export, so the ranks must snapshot at the same batch:
    rank 0's clock decides, told to the others through a :class:`HostVote` at every batch (one integer over gloo,
    on the host). Under the other strategies rank 0 exports alone and nothing is exchanged."""

    def __init__(self, out_dir: str | Path, every_min: float, timeout_s: float = 600.0) -> None:
        if every_min <= 0:
            raise ValueError(f"train.snapshot_every_min must be > 0, got {every_min}")
        self.out_dir, self.every_s = Path(out_dir), 60.0 * float(every_min)
        self._t0: float | None = None
        self._next = self.every_s
        self._last_step = -1
        self.vote: HostVote | None = None
        self.timeout_s = float(timeout_s)

    def on_train_start(self, trainer: L.Trainer, module: Any) -> None:
        self._t0 = time.perf_counter()
        if is_sharding(module):
            self.vote = HostVote(self.timeout_s)
            self.vote.open(trainer)

    def due(self, trainer: L.Trainer, elapsed: float) -> bool:
        """Whether this batch takes a snapshot: by rank 0's clock on every rank when the ranks export together."""
        mine = elapsed >= self._next
        return mine if self.vote is None else self.vote.any(mine and trainer.is_global_zero)

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        elapsed = time.perf_counter() - (self._t0 or time.perf_counter())
        if self.due(trainer, elapsed):
            self._next += self.every_s * (1 + int((elapsed - self._next) // self.every_s))
            self.snapshot(trainer, module, elapsed)

    def on_train_end(self, trainer: L.Trainer, module: Any) -> None:
        if trainer.global_step != self._last_step:
            self.snapshot(trainer, module, time.perf_counter() - (self._t0 or time.perf_counter()))

    def snapshot(self, trainer: L.Trainer, module: Any, elapsed: float) -> None:
        self._last_step = step = trainer.global_step
        path = self.out_dir / f"step_{step:08d}" / "model.safetensors"
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
        if joins(trainer, module):  # fsdp: every rank gathers the shards, rank 0 writes
            module.export(str(path))
        if not trainer.is_global_zero:
            return
        cfg = getattr(module, "config", None)
        batch = int(cfg.data.get("batch_size", 0)) if cfg is not None and "data" in cfg else 0
        seen = int(getattr(module, "batches_seen", step))
        rec = {"step": step, "train_s": round(elapsed, 2), "images": seen * batch * trainer.world_size,
               "path": str(path)}
        with open(self.out_dir / "index.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        log.info("snapshot at step %d after %.0f s: %s", step, elapsed, path)


# Lightning's warning at the start of training for any module in eval mode; ldm's are the frozen components
EVAL_MODE_WARNING = r"Found \d+ module\(s\) in eval mode at the start of training"


# Lightning's warning when the checkpoint folder holds files: a resumed run's own
NOT_EMPTY_WARNING = r"Checkpoint directory .* exists and is not empty"


# Lightning's warning at every checkpoint under manual optimization that the state is saved after the optimizer step
MANUAL_OPTIMIZATION_WARNING = "Using ModelCheckpoint with manual optimization"


@contextmanager
def warnings_ignored(*patterns: str) -> Iterator[None]:
    """Warnings whose message matches any of ``patterns`` (regular expressions) are dropped inside the block."""
    with warnings.catch_warnings():
        for pattern in patterns:
            warnings.filterwarnings("ignore", message=pattern)
        yield


def expected_warnings_quiet(resuming: bool) -> ContextManager[None]:
    """Around ``trainer.fit``: without Lightning's count of modules in eval mode, which :class:`EvalModeReport` replaces
    with one that tells frozen components from trainable ones, and, when ``resuming``, without its warning that the
    checkpoint folder is not empty (a new run into a folder of checkpoints is still warned about)."""
    return warnings_ignored(EVAL_MODE_WARNING, *([NOT_EMPTY_WARNING] if resuming else []))


class EvalModeReport(L.Callback):
    """At the start of training: the top-level components in eval mode, at INFO (the frozen first stage and text
    encoder of the U-Net stage, the autoencoder stage's LPIPS), and a warning naming any module in eval mode that
    has trainable parameters (dropout and normalization would act as at inference on weights being trained)."""

    def on_train_start(self, trainer: L.Trainer, module: Any) -> None:
        if trainer.is_global_zero:
            report_eval_modules(module)


def report_eval_modules(module: torch.nn.Module) -> list[str]:
    """Log the components in eval mode of a module about to train; returns the eval-mode modules with trainable
    parameters of their own (each named in a warning), but for those the module lists in ``trains_in_eval`` (name ->
    why, logged at INFO)."""
    evals = [(n, m) for n, m in module.named_modules() if n and not m.training]
    if not evals:
        return []
    per_part = Counter(n.split(".")[0] if not n.startswith("net.") else ".".join(n.split(".")[:2]) for n, _ in evals)
    log.info("in eval mode while training (frozen): %s", ", ".join(f"{p} ({k} modules)" for p, k in per_part.items()))
    bad = [n for n, m in evals if any(p.requires_grad for p in m.parameters(recurse=False))]
    meant = getattr(module, "trains_in_eval", {})  # name -> why: a stage that trains such a module on purpose
    for n in [n for n in bad if n in meant]:
        log.info("%s trains in eval mode: %s", n, meant[n])
    bad = [n for n in bad if n not in meant]
    for n in bad:
        log.warning("%s is in eval mode but has trainable parameters: it trains as at inference (dropout off, "
                    "normalization statistics frozen)", n)
    return bad
