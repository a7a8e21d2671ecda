"""Per-step metrics without host syncs.

Reading a GPU tensor on the host (``.item()``, ``.cpu()``, a Python number made into a device tensor) waits for the
GPU's whole queue; the GPU then idles while the host fills it again. Lightning's own route does that at every log
step: it reads each logged device tensor, and its ``LearningRateMonitor`` makes a device tensor of each rate. On an
H100 the SD-1.5 loop at 512 px was 98.5% busy with ~3.6 such reads per log step, 6.4 ms of idle per step
(docs/BENCHMARKS.md, twelfth session). Here instead:

- :func:`log_step` sends a log step's values (``trainer.log_every_n_steps``) to the loggers itself, in one row:
  through :class:`HostReads`, where the device tensors take a non-blocking copy into pinned host memory with a CUDA
  event, and the row is logged under its own step once the GPU has passed the event (polled at each later call,
  waited for at checkpoints and at the end of training: :func:`write_logs`). The progress bar's device values take
  the same way on the steps it redraws (``logging.progress_every_n_steps``) and show once they have arrived.
- :class:`LearningRates` logs each optimizer's learning rates as numbers, under ``LearningRateMonitor``'s names.

Under gradient accumulation (``trainer.accumulate_grad_batches: k``, applied by
:func:`ldm.training.guard.guarded_step`) a row stands for an optimizer step, as with Lightning's automatic
optimization and in diffusers' scripts: the batch that closes a window of k logs it, under the window's index (the
optimizer-step axis of ``val/*``, the checkpoints and ``trainer.max_steps``), every ``trainer.log_every_n_steps``
windows, with each tensor averaged over the window's k batches (summed on the device as they come: no host read);
numbers (the learning rate, the skip counts) are the closing batch's, and the diffusion stage gives its img/s there,
over the whole step. Without accumulation a row is a batch, logged where and as Lightning's ``self.log`` logs it.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import lightning as L
import torch


class _Read(NamedTuple):
    step: int | None
    numbers: dict[str, float | int]
    names: list[str]
    host: torch.Tensor  # (n,) float32 on the host; complete once ``event`` has passed
    event: Any  # torch.cuda.Event, or None for values that were on the host already


def on_host(t: torch.Tensor) -> bool:
    """Whether reading ``t`` costs no wait for a device."""
    return t.device.type == "cpu"


def copy_to_host(values: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """``values`` on the host and the event after which the copy is complete (None: complete now). A CUDA tensor
    is copied without waiting: into pinned memory, ordered after the kernels that compute it."""
    if values.device.type != "cuda":
        return values.cpu(), None
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(values.device))  # the stream the copy went on
    return host, event


class HostReads:
    """Metrics of log steps on their way to the host, oldest first."""

    def __init__(self) -> None:
        self._pending: deque[_Read] = deque()

    def __len__(self) -> int:
        return len(self._pending)

    def put(self, step: int | None, values: Mapping[str, torch.Tensor | float]) -> None:
        """Queue ``values`` (name -> number or 0-dim tensor) of ``step``; the tensors are copied in one transfer."""
        on_device = {k: v for k, v in values.items() if isinstance(v, torch.Tensor) and not on_host(v)}
        numbers = {k: v if isinstance(v, int) else float(v.detach() if isinstance(v, torch.Tensor) else v)
                   for k, v in values.items() if k not in on_device}
        names = list(on_device)  # of one device: the module's
        stacked = torch.stack([on_device[k].detach().float().reshape(()) for k in names]) if names else torch.zeros(0)
        host, event = copy_to_host(stacked)  # (n,)
        self._pending.append(_Read(step, numbers, names, host, event))

    def ready(self, wait: bool = False) -> list[tuple[int | None, dict[str, float]]]:
        """(step, name -> number) of the reads that have arrived, in order; ``wait``: all of them (a host sync)."""
        out = []
        while self._pending:
            read = self._pending[0]
            if read.event is not None and not read.event.query():
                if not wait:
                    break
                read.event.synchronize()
            self._pending.popleft()
            out.append((read.step, {**read.numbers, **dict(zip(read.names, read.host.tolist()))}))
        return out


def batches_per_step(module: Any) -> int:
    """k: the batches of one optimizer step, ``trainer.accumulate_grad_batches`` of the module's config (1 for a module
    without one), read once per config (a lookup in it takes ~60 µs of host time, asked several times a batch: the
    guard, the step's generator, the logs)."""
    from ldm.training.optim import accumulate_batches  # noqa: PLC0415 - optim imports this module

    cfg = getattr(module, "config", None)
    cached = vars(module).get("_batches_per_step")
    if cached is None or cached[0] is not cfg:
        cached = vars(module)["_batches_per_step"] = (cfg, accumulate_batches(cfg) if cfg is not None else 1)
    return cached[1]


def closes_window(module: Any, k: int, ahead: int = 0) -> bool:
    """Whether this batch closes its window of k, by :func:`ldm.training.guard.guarded_step`'s rule (it steps the
    optimizer then): ``module.batches_seen`` (counting this batch; ``ahead`` 1 before ``training_step`` counts it) is a
    multiple of k."""
    return k == 1 or (int(module.batches_seen) + ahead) % k == 0


def logger_step(module: Any, k: int, ahead: int = 0) -> int:
    """The step this batch's training metrics are logged under: the optimizer steps before it. Without accumulation
    Lightning's count of the batches before this one (as ``self.log`` logs them); with k batches a step, the index of
    this batch's window (``ahead`` as in :func:`closes_window`), so that the windows and ``val/*`` share one axis."""
    if k == 1:
        return int(module.trainer.fit_loop.epoch_loop._batches_that_stepped)
    return (int(module.batches_seen) + ahead - 1) // k


def logs_this_step(module: Any, k: int, ahead: int = 0) -> bool:
    """Whether this batch's metrics go to the loggers: every ``trainer.log_every_n_steps`` optimizer steps and when the
    run is stopping, as Lightning decides for ``self.log``; with accumulation on a window's last batch only."""
    trainer = module.trainer
    if not trainer.loggers:
        return False
    if k == 1:
        return bool(trainer._logger_connector.should_update_logs)
    every = int(trainer.log_every_n_steps or 0)
    if not every or not closes_window(module, k, ahead):
        return False
    return (logger_step(module, k, ahead) + 1) % every == 0 or bool(trainer.should_stop)


def bar_redraws(module: Any) -> bool:
    """Whether the progress bar redraws at the end of this batch (as TQDMProgressBar decides)."""
    trainer = module.trainer
    bar = getattr(trainer, "progress_bar_callback", None)
    rate = getattr(bar, "refresh_rate", 0) if bar is not None and getattr(bar, "is_enabled", True) else 0
    return bool(rate) and (trainer.fit_loop.epoch_loop.batch_idx + 1) % rate == 0


def host_reads(module: Any, queue: str = "loggers") -> HostReads:
    """The module's metrics on their way to the host, for the loggers or for the progress bar."""
    return vars(module).setdefault(f"_host_reads_{queue}", HostReads())


def write_logs(module: Any, wait: bool = False) -> None:
    """Send the metrics that have reached the host to every logger under their own steps; ``wait``: all of them, and
    every logger saves what it holds (at checkpoints and at the end of training): the rows logged before a checkpoint
    are on disk with it, also those that no training row has saved yet (``val/*`` between sparse log steps), which a
    run killed after the checkpoint would otherwise lose (the resumed run does not log them again)."""
    trainer = module.trainer
    for step, metrics in host_reads(module).ready(wait):
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            logger.save()
    if wait:
        for logger in trainer.loggers:
            logger.save()


def mean_over_ranks(trainer: Any, values: Mapping[str, torch.Tensor | float]) -> dict[str, torch.Tensor | float]:
    """``values`` with each tensor replaced by its mean over the ranks (one all-reduce of them all, enqueued on the
    device's stream: no host wait); numbers stay as they are (the learning rate, the skip count: the same on every
    rank). Every rank must call it at the same steps (the log steps are). Without it a multi-GPU run logged rank 0's
    ``train/loss`` alone, the loss of 1/world of the global batch."""
    names = [k for k, v in values.items() if isinstance(v, torch.Tensor)]
    world = int(getattr(trainer, "world_size", 1) or 1)
    if world <= 1 or not names or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return dict(values)
    stacked = torch.stack([values[k].detach().float().reshape(()) for k in names])  # (n,) on the module's device
    torch.distributed.all_reduce(stacked, op=torch.distributed.ReduceOp.SUM)
    return {**values, **dict(zip(names, (stacked / world).unbind()))}


def log_step(module: Any, values: Mapping[str, torch.Tensor | float], bar: Iterable[str] = (),
             last: Iterable[str] = ()) -> None:
    """Log ``values`` (name -> 0-dim tensor or number) of this training batch, without a host sync (see the module
    docstring): to the loggers on log steps, with the epoch, averaged over the accumulation window (the tensors not
    named in ``last``, which are states such as a temperature: the closing batch's value); the names in ``bar`` to
    the progress bar too, under their last path part (``train/loss`` -> ``loss``), each step with the latest values
    that have reached the host (read on the steps the bar redraws)."""
    trainer = module.trainer
    k = batches_per_step(module)
    logged = over_window(module, values, k, tuple(last)) if trainer.loggers else None
    if logged is not None and logs_this_step(module, k):
        averaged = mean_over_ranks(trainer, logged)
        host_reads(module).put(logger_step(module, k), {**averaged, "epoch": trainer.current_epoch})
    write_logs(module)
    shown = {name: values[name] for name in bar if name in values}
    if shown:
        _show_on_bar(module, shown)


def over_window(module: Any, values: Mapping[str, torch.Tensor | float], k: int,
                last: tuple[str, ...] = ()) -> dict[str, torch.Tensor | float] | None:
    """``values`` of a batch that closes its window of k (:func:`closes_window`), each tensor not named in ``last``
    replaced by its mean over the window's batches, summed on the device batch by batch (no host read); None for the
    batches before. Without accumulation ``values`` as they are."""
    if k == 1:
        return dict(values)
    sums: dict[str, tuple[torch.Tensor, int]] = vars(module).setdefault("_window_sums", {})
    for name, value in values.items():
        if isinstance(value, torch.Tensor) and name not in last:
            total, n = sums.get(name, (None, 0))
            value = value.detach().float()
            sums[name] = (value if total is None else total + value, n + 1)
    if not closes_window(module, k):
        return None
    means = {name: total / n for name, (total, n) in sums.items()}
    sums.clear()
    return {name: means.get(name, value) for name, value in values.items()}


def _show_on_bar(module: Any, values: Mapping[str, torch.Tensor | float]) -> None:
    """Values of this step's that are on the host, the others as last read (read anew when the bar redraws)."""
    latest: dict[str, float] = vars(module).setdefault("_bar_values", {})
    reads = host_reads(module, "bar")
    if bar_redraws(module):
        reads.put(None, values)
    for _, arrived in reads.ready():
        latest.update(arrived)
    for name, value in values.items():
        if not isinstance(value, torch.Tensor) or on_host(value):
            latest[name] = float(value)
        if name in latest:
            module.log(name.rsplit("/", 1)[-1], torch.tensor(latest[name]), prog_bar=True, logger=False)


class LearningRates(L.Callback):
    """Each optimizer's learning rate per parameter group on the log steps, as numbers read from the optimizer (no
    device tensor), under ``LearningRateMonitor``'s names: ``lr-AdamW``, ``lr-Adam-1`` for the second optimizer of
    a type, ``lr-AdamW/pg2`` for a second parameter group."""

    def on_train_batch_start(self, trainer: L.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
        """On the batches whose metrics :func:`log_step` logs, under their step: the rates this batch's optimizer step
        uses (``batches_seen`` counts the batch only in ``training_step``, so 1 ahead here)."""
        k = batches_per_step(module)
        if logs_this_step(module, k, ahead=1):
            rates, step = learning_rates(trainer.optimizers), logger_step(module, k, ahead=1)
            for logger in trainer.loggers:
                logger.log_metrics(rates, step=step)


def learning_rates(optimizers: Iterable[torch.optim.Optimizer]) -> dict[str, float]:
    """name -> learning rate of every parameter group (see :class:`LearningRates`)."""
    out: dict[str, float] = {}
    seen: dict[str, int] = {}
    for opt in optimizers:
        kind = type(opt).__name__
        name = f"lr-{kind}" + (f"-{seen[kind]}" if kind in seen else "")
        seen[kind] = seen.get(kind, 0) + 1
        groups = opt.param_groups
        for j, group in enumerate(groups):
            out[name + (f"/pg{j + 1}" if len(groups) > 1 else "")] = float(group["lr"])
    return out
