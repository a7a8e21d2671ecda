"""Per-step logging reads nothing back from the GPU while training: a log step's values reach the loggers under the
steps Lightning's ``self.log`` uses, device tensors once the GPU has passed them, and the progress bar sees device
tensors only on the steps it redraws."""
from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger

import ldm.training.step_log as step_log
from ldm.training.step_log import HostReads, LearningRates, learning_rates, log_step, write_logs


class Recorder:
    """A module without loggers: only the progress bar's calls of ``log``."""

    def __init__(self, batch_idx: int, refresh_rate: int | None):
        bar = None if refresh_rate is None else SimpleNamespace(refresh_rate=refresh_rate, is_enabled=True)
        loop = SimpleNamespace(epoch_loop=SimpleNamespace(batch_idx=batch_idx))
        self.trainer = SimpleNamespace(progress_bar_callback=bar, fit_loop=loop, loggers=[])
        self.calls: list[tuple] = []

    def log(self, name, value, prog_bar=False, logger=True):
        self.calls.append((name, value.device.type, prog_bar, logger, value.item()))


def device_tensor():
    return torch.empty((), device="meta")  # stands for a GPU tensor: not on the host


def test_the_bar_shows_numbers_each_step_and_device_values_once_read_on_its_redraws(monkeypatch):
    arrivals: list[Event] = []

    def copy(t):
        arrivals.append(Event())
        return torch.full(t.shape, 0.5), arrivals[-1]

    monkeypatch.setattr(step_log, "copy_to_host", copy)
    m = Recorder(batch_idx=3, refresh_rate=10)  # batch 4: the bar does not redraw

    def step(batch_idx):
        m.trainer.fit_loop.epoch_loop.batch_idx = batch_idx
        m.calls.clear()
        log_step(m, {"train/loss": device_tensor(), "train/lr": 1e-4, "train/img_per_s": 12.5},
                 bar=("train/loss", "train/img_per_s"))
        return m.calls

    assert step(3) == [("img_per_s", "cpu", True, False, 12.5)] and arrivals == []
    assert step(9) == [("img_per_s", "cpu", True, False, 12.5)] and len(arrivals) == 1  # redraw: the loss is read
    arrivals[0].passed = True
    assert step(10) == [("loss", "cpu", True, False, 0.5), ("img_per_s", "cpu", True, False, 12.5)]
    assert step(11)[0] == ("loss", "cpu", True, False, 0.5) and len(arrivals) == 1  # as last read
    quiet = Recorder(batch_idx=9, refresh_rate=None)  # no progress bar at all: nothing read, nothing shown
    log_step(quiet, {"train/loss": device_tensor()}, bar=("train/loss",))
    assert quiet.calls == [] and len(arrivals) == 1


def test_bar_redraws_follows_a_real_trainers_progress_bar():
    import lightning as L
    from lightning.pytorch.callbacks import TQDMProgressBar

    from ldm.training.step_log import bar_redraws

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))
            self.seen: list[bool] = []

        def training_step(self, batch, i):
            self.seen.append(bar_redraws(self))
            return (self.w * batch).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    m = Probe()
    data = torch.utils.data.DataLoader(torch.ones(7, 1), batch_size=1)
    L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_model_summary=False,
              callbacks=[TQDMProgressBar(refresh_rate=3)]).fit(m, data)
    assert m.seen == [False, False, True, False, False, True, False]


class Event:
    """A CUDA event stand-in that has passed once ``passed`` is set."""

    def __init__(self):
        self.passed, self.waited = False, False

    def query(self):
        return self.passed

    def synchronize(self):
        self.waited = not self.passed


def test_host_reads_copy_the_device_tensors_and_take_host_tensors_as_numbers(monkeypatch):
    """The autoencoder's losses hold a CPU tensor (disc_factor) beside device ones: one copy, of the device ones."""
    copied = []

    def copy(t):
        copied.append((t.device.type, tuple(t.shape)))
        return torch.tensor([0.5, 2.0]), None

    monkeypatch.setattr(step_log, "copy_to_host", copy)
    reads = HostReads()
    reads.put(4, {"train/loss": device_tensor(), "train/disc_factor": torch.tensor(1.0), "train/d_weight": torch.empty(
        (1,), device="meta"), "train/skipped": 0})
    assert copied == [("meta", (2,))]
    assert reads.ready() == [(4, {"train/disc_factor": 1.0, "train/skipped": 0, "train/loss": 0.5,
                                  "train/d_weight": 2.0})]


def test_host_reads_come_out_in_order_once_their_events_have_passed(monkeypatch):
    events: list[Event] = []

    def copy(t):
        events.append(Event())
        return t.clone(), events[-1]

    monkeypatch.setattr(step_log, "copy_to_host", copy)
    reads = HostReads()
    reads.put(10, {"train/loss": torch.tensor(0.5), "train/lr": 1e-4, "epoch": 0})
    reads.put(20, {"train/loss": torch.tensor(0.25, dtype=torch.bfloat16), "train/skipped": 2})
    assert reads.ready() == [] and len(reads) == 2
    events[1].passed = True
    assert reads.ready() == []  # the older read first
    events[0].passed = True
    assert reads.ready() == [(10, {"train/lr": 1e-4, "epoch": 0, "train/loss": 0.5}),
                             (20, {"train/skipped": 2, "train/loss": 0.25})]
    reads.put(30, {"train/loss": torch.tensor(1.0)})
    assert reads.ready(wait=True) == [(30, {"train/loss": 1.0})] and events[2].waited and len(reads) == 0


class Logged(Logger):
    def __init__(self):
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    name, version, log_hyperparams = "logged", "0", (lambda self, *a, **k: None)

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))


class Steps(L.LightningModule):
    """Logs a loss tensor, a number and an integer each batch, through ``log_step`` or Lightning's ``self.log``."""

    def __init__(self, ours: bool):
        super().__init__()
        self.ours, self.w = ours, torch.nn.Parameter(torch.ones(1))

    def training_step(self, batch, i):
        loss = (self.w * batch).sum()
        values = {"train/loss": loss.detach(), "train/lr": 0.1 / (i + 1), "train/skipped": i}
        if self.ours:
            log_step(self, values)
        else:
            for k, v in values.items():
                self.log(k, v if isinstance(v, torch.Tensor) else float(v))
        return loss

    def on_train_end(self):
        write_logs(self, wait=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def logged_by(module, every: int, callbacks=()) -> list[tuple[int, dict]]:
    logger = Logged()
    data = torch.utils.data.DataLoader(torch.arange(1.0, 12.0).reshape(11, 1), batch_size=1)
    L.Trainer(max_epochs=1, accelerator="cpu", logger=logger, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, log_every_n_steps=every, callbacks=list(callbacks)).fit(module, data)
    return logger.rows


def test_log_steps_reach_the_loggers_as_lightnings_own_self_log_sends_them():
    ours, theirs = logged_by(Steps(ours=True), every=3), logged_by(Steps(ours=False), every=3)
    assert [s for s, _ in ours] == [s for s, _ in theirs] == [2, 5, 8]
    for (_, a), (_, b) in zip(ours, theirs):
        assert a.keys() == b.keys() == {"train/loss", "train/lr", "train/skipped", "epoch"}
        assert a == pytest.approx(b)


def test_log_steps_on_the_gpu_are_written_when_their_copies_arrive(monkeypatch):
    """With copies that arrive two log steps later, each log step's row is written then, the last two at the end of
    training, with the same steps and values as read at once."""
    pending: list[Event] = []

    def copy(t):
        assert t.shape == (1,)  # the loss
        for e in pending[:-1]:  # an event passes when the second read after it starts
            e.passed = True
        pending.append(Event())
        return t.clone(), pending[-1]

    at_once = logged_by(Steps(ours=True), every=2)
    monkeypatch.setattr(step_log, "copy_to_host", copy)
    monkeypatch.setattr(step_log, "on_host", lambda t: False)  # the loss tensor stands for a device one
    later = logged_by(Steps(ours=True), every=2)
    assert later == at_once and [s for s, _ in later] == [1, 3, 5, 7, 9]
    assert [e.waited for e in pending] == [False] * 3 + [True] * 2  # the end of training waited for the last two


def test_learning_rates_are_named_as_lightnings_monitor_names_them():
    w = [torch.nn.Parameter(torch.ones(1)) for _ in range(3)]
    two_groups = torch.optim.AdamW([{"params": [w[0]]}, {"params": [w[1]], "lr": 0.5}], lr=0.25)
    rates = learning_rates([two_groups, torch.optim.Adam([w[2]], lr=0.125), torch.optim.Adam([w[2]], lr=1.0)])
    assert rates == {"lr-AdamW/pg1": 0.25, "lr-AdamW/pg2": 0.5, "lr-Adam": 0.125, "lr-Adam-1": 1.0}


def test_learning_rates_log_what_lightnings_monitor_logs():
    from lightning.pytorch.callbacks import LearningRateMonitor

    ours = logged_by(Steps(ours=True), every=4, callbacks=[LearningRates()])
    theirs = logged_by(Steps(ours=True), every=4, callbacks=[LearningRateMonitor(logging_interval="step")])
    assert [r for r in ours if "lr-SGD" in r[1]] == [r for r in theirs if "lr-SGD" in r[1]] == [
        (3, {"lr-SGD": 0.1}), (7, {"lr-SGD": 0.1})]


@pytest.mark.gpu
def test_log_step_reads_and_the_guards_counts_make_no_synchronizing_cuda_call():
    """On a GPU, queueing a log step's values and the guard's counts and polling for them raise nothing under
    ``torch.cuda.set_sync_debug_mode("error")``; the values arrive (waited for outside it) as computed."""
    from ldm.training.guard import StepGuard

    loss = torch.randn(64, device="cuda").square().mean()
    flags = [torch.tensor(ok, device="cuda") for ok in (True, False, False)]  # (a copy from the host: a sync)
    guard, reads = StepGuard(max_consecutive=5), HostReads()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for ok in flags:
            guard.record_on_device(ok)
        guard.read_later(2)
        reads.put(7, {"train/loss": loss.detach(), "train/lr": 1e-4, "train/disc_factor": torch.tensor(1.0)})
        arrived = reads.ready()  # the copy may already have landed (an H100 is that fast): then the row is here
        guard.poll()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert arrived + reads.ready(wait=True) == [(7, {"train/lr": 1e-4, "train/disc_factor": 1.0,
                                                     "train/loss": pytest.approx(loss.item())})]
    guard.poll(wait=True)
    assert guard.skipped == 2 and guard.consecutive == 2
