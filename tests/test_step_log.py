"""Per-step logging reads nothing back from the GPU: numbers go in as CPU tensors, device tensors reach the
progress bar only on the steps it redraws."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from ldm.training.step_log import log_step


class Recorder:
    def __init__(self, batch_idx: int, refresh_rate: int | None):
        bar = None if refresh_rate is None else SimpleNamespace(refresh_rate=refresh_rate, is_enabled=True)
        loop = SimpleNamespace(epoch_loop=SimpleNamespace(batch_idx=batch_idx))
        self.trainer = SimpleNamespace(progress_bar_callback=bar, fit_loop=loop)
        self.calls: list[tuple] = []

    def log(self, name, value, prog_bar=False, logger=True):
        self.calls.append((name, value.device.type, prog_bar, logger))


def device_tensor():
    return torch.empty((), device="meta")  # stands for a GPU tensor: not on the host


def test_numbers_become_cpu_tensors_and_device_values_stay_off_the_bar_between_redraws():
    m = Recorder(batch_idx=3, refresh_rate=10)  # batch 4: the bar does not redraw
    log_step(m, {"train/loss": device_tensor(), "train/lr": 1e-4, "train/img_per_s": 12.5},
             bar=("train/loss", "train/img_per_s"))
    assert m.calls == [("train/loss", "meta", False, True), ("train/lr", "cpu", False, True),
                       ("train/img_per_s", "cpu", False, True), ("img_per_s", "cpu", True, False)]


def test_device_values_reach_the_bar_when_it_redraws_only():
    m = Recorder(batch_idx=9, refresh_rate=10)  # batch 10: redraw
    log_step(m, {"train/loss": device_tensor(), "train/acc": device_tensor()}, bar=("train/loss", "train/acc"))
    assert m.calls == [("train/loss", "meta", False, True), ("loss", "meta", True, False),
                       ("train/acc", "meta", False, True), ("acc", "meta", True, False)]
    quiet = Recorder(batch_idx=9, refresh_rate=None)  # no progress bar at all
    log_step(quiet, {"train/loss": device_tensor()}, bar=("train/loss",))
    assert quiet.calls == [("train/loss", "meta", False, True)]


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
