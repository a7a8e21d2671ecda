"""fp16 AMP: a step that Lightning's grad scaler skips (inf/NaN gradients, found inside ``optimizer.step()``) is not
taken for the caller either: ``guarded_step`` returns False, so neither the LR schedule nor the EMA advances; it is
counted apart (``amp_skipped``, in checkpoints, logged as ``train/amp_skipped``) and logged at info level (the
scale calibrating); a long run of them (NaN gradients on every step) stops the run with a NonFiniteError. Driven by
a real ``torch.amp.GradScaler("cpu")`` inside Lightning's ``MixedPrecision("16-mixed", "cpu")`` (Lightning turns
``precision="16-mixed"`` on CPU into bf16, without a scaler, so the plugin is passed as such)."""
from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from ldm.cli.train import run
from ldm.ema import EMA
from ldm.training.guard import AMP_LOG_FIRST, NonFiniteError, StepGuard, guarded_step
from ldm.training.logs import logged

INF, NAN = float("inf"), float("nan")


def poisoned(t: torch.Tensor, value: float) -> torch.Tensor:
    """``t`` itself, whose gradient in the backward is replaced by ``value`` everywhere (the loss stays finite)."""
    t.register_hook(lambda g: torch.full_like(g, value))
    return t


class AmpToy(L.LightningModule):
    """A 3-weight linear layer trained by ``guarded_step`` (SGD, a LambdaLR schedule, an EMA) as the stages are: the
    schedule and the EMA step only when ``guarded_step`` says so (``taken``; ``moved``: whether the weights changed).
    Batch i's gradients are ``value`` for i in ``bad``
    (``bad=None``: every batch); its loss is NaN for i in ``nan_loss``."""

    def __init__(self, bad: Iterable[int] | None = (), value: float = INF, max_consecutive: int = 10,
                 nan_loss: Iterable[int] = ()) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = torch.nn.Linear(3, 1, bias=False)
        torch.nn.init.ones_(self.net.weight)
        self.ema = EMA(self.net, decay=0.9)
        self.bad, self.value = None if bad is None else set(bad), value
        self.nan_loss = set(nan_loss)  # batches whose loss is NaN (the guard skips them before the scaler)
        self.guard = StepGuard(max_consecutive)
        self.taken: list[bool] = []
        self.moved: list[bool] = []
        self.scales: list[float] = []  # the scaler's loss scale after each step

    def training_step(self, batch: torch.Tensor, i: int) -> None:
        out = self.net(batch)
        if self.bad is None or i in self.bad:
            out = poisoned(out, self.value)
        if i in self.nan_loss:
            out = out * NAN
        before = self.net.weight.detach().clone()
        took = guarded_step(self, self.optimizers(), out.float().sum(), list(self.net.parameters()))
        self.moved.append(not torch.equal(before, self.net.weight.detach()))
        assert self.moved[-1] == (took and i not in self.nan_loss)  # a NaN loss's skip: a zero update
        if took:
            self.lr_schedulers().step()
            self.ema.update(self.net)
        self.taken.append(took)
        self.scales.append(self.trainer.precision_plugin.scaler.get_scale())

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.net.parameters(), lr=0.1)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))}


def fit_fp16(module: AmpToy, n: int, **scaler: float) -> AmpToy:
    """``n`` steps under Lightning's fp16 AMP plugin with a real CPU GradScaler (``scaler``: its arguments)."""
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", **scaler))
    L.Trainer(max_epochs=1, accelerator="cpu", plugins=[plugin], logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(
        module, torch.utils.data.DataLoader(torch.ones(n, 3), batch_size=1))
    return module


def schedule_steps(module: L.LightningModule) -> int:
    return int(module.lr_schedulers().last_epoch)


def guard_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "ldm.training.guard"]


def test_a_step_the_scaler_skips_takes_no_schedule_or_ema_step_and_is_counted(
        caplog: pytest.LogCaptureFixture) -> None:
    """inf gradients (finite loss) on batches 1 and 2: the scaler skips both steps and halves its scale each time;
    ``guarded_step`` returns False, the schedule and the EMA advance only for the 4 steps taken; both skips are
    counted in ``amp_skipped`` (not in ``skipped``, not towards ``max_consecutive`` = 2), logged at info level."""
    caplog.set_level(logging.INFO, logger="ldm.training.guard")
    m = fit_fp16(AmpToy(bad={1, 2}, max_consecutive=2), 6, init_scale=1024.0)
    assert m.taken == [True, False, False, True, True, True]
    assert m.scales[:3] == [1024.0, 512.0, 256.0]
    assert schedule_steps(m) == 4 and int(m.ema.num_updates) == 4
    assert (m.guard.amp_skipped, m.guard.amp_consecutive, m.guard.skipped, m.guard.consecutive) == (2, 0, 0, 0)
    records = guard_records(caplog)
    assert [r.levelno for r in records] == [logging.INFO, logging.INFO]
    assert "step 1: the fp16 grad scaler found inf/NaN gradients and skipped the step" in records[0].getMessage()
    assert "loss scale now 256 (2 skipped so far" in records[1].getMessage()


def test_steps_the_scaler_takes_return_true_as_the_scale_grows(caplog: pytest.LogCaptureFixture) -> None:
    """Finite gradients, the scale doubling after every step (growth_interval 1): a changed scale is not a skip; every
    step is taken, with its schedule and EMA step, and nothing is counted or logged."""
    caplog.set_level(logging.DEBUG, logger="ldm.training.guard")
    m = fit_fp16(AmpToy(), 5, init_scale=8.0, growth_interval=1)
    assert m.taken == [True] * 5 and m.scales == [16.0, 32.0, 64.0, 128.0, 256.0]
    assert schedule_steps(m) == 5 and int(m.ema.num_updates) == 5
    assert m.guard.state_dict() == {"skipped": 0, "consecutive": 0, "amp_skipped": 0, "amp_consecutive": 0}
    assert not guard_records(caplog)


def test_a_long_run_of_nan_gradients_stops_the_run_naming_the_grad_scaler(caplog: pytest.LogCaptureFixture) -> None:
    """NaN gradients on every step from the default scale 2^16: each skip halves it, and the 30th leaves it at
    2^-14 < 1e-4, where the run stops naming the grad scaler, the NaN/inf gradients and the step. Nothing was
    trained, no schedule or EMA step taken; only the first ``AMP_LOG_FIRST`` skips are logged at info level."""
    caplog.set_level(logging.DEBUG, logger="ldm.training.guard")
    m = AmpToy(bad=None, value=NAN)
    with pytest.raises(NonFiniteError, match=r"fp16 grad scaler skipped 30 consecutive steps for inf/NaN gradients "
                                             r"\(last at step 29\) and its loss scale fell to 6\.1e-05 < 0\.0001"):
        fit_fp16(m, 60)
    assert m.taken == [False] * 29 and m.guard.amp_skipped == 30 and m.guard.skipped == 0
    assert schedule_steps(m) == 0 and int(m.ema.num_updates) == 0
    assert torch.equal(m.net.weight.detach(), torch.ones(1, 3))
    levels = [r.levelno for r in guard_records(caplog)]
    assert levels == [logging.INFO] * AMP_LOG_FIRST + [logging.DEBUG] * (29 - AMP_LOG_FIRST)


def test_a_nan_loss_under_fp16_is_skipped_before_the_scaler_and_counts_in_global_step() -> None:
    """A NaN loss under fp16: the guard skips the step on the host before the grad scaler sees it (no
    ``optimizer.step()``: its scale stays, and it has no inf checks to miss), counted in ``skipped``, not in
    ``amp_skipped``; a zero update as on the device (the schedule and the EMA step, the weights stay), and
    ``trainer.global_step`` counts it as it counts a scaler skip."""
    m = fit_fp16(AmpToy(nan_loss={1}), 4, init_scale=1024.0)
    assert m.taken == [True] * 4 and m.moved == [True, False, True, True] and m.scales == [1024.0] * 4
    assert m.trainer.global_step == 4
    assert schedule_steps(m) == 4 and int(m.ema.num_updates) == 4
    assert (m.guard.skipped, m.guard.amp_skipped) == (1, 0)


def test_scaler_skip_counts_survive_the_guard_state_and_old_states_load() -> None:
    """The counts go into the guard's state (the checkpoints' ``step_guard``) and come back; a state saved before
    they existed loads with them at 0."""
    m = fit_fp16(AmpToy(bad={2, 3}), 4, init_scale=1024.0)
    state = m.guard.state_dict()
    assert state == {"skipped": 0, "consecutive": 0, "amp_skipped": 2, "amp_consecutive": 2}
    g = StepGuard()
    g.load_state_dict(state)
    assert (g.amp_skipped, g.amp_consecutive) == (2, 2)
    g.record_amp(True, 64.0, 4)  # the run goes on across a resume
    assert (g.amp_skipped, g.amp_consecutive) == (3, 3)
    old = StepGuard()
    old.load_state_dict({"skipped": 4, "consecutive": 1})  # a checkpoint written before amp_skipped
    assert old.state_dict() == {"skipped": 4, "consecutive": 1, "amp_skipped": 0, "amp_consecutive": 0}


# -- the stages --------------------------------------------------------------------------------------------------

@pytest.fixture
def fp16_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ldm-train``'s Trainer with Lightning's fp16 AMP plugin and a real CPU GradScaler (scale 1: no overflow of
    the tiny models' true gradients), as ``trainer.precision: 16-mixed`` gives on a GPU."""
    import ldm.training.trainer as trainer_module

    class Fp16Trainer(L.Trainer):
        def __init__(self, *args: Any, plugins: Iterable[Any] = (), **kwargs: Any) -> None:
            kwargs.pop("precision", None)
            amp = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1.0))
            super().__init__(*args, plugins=[*plugins, amp], **kwargs)

    monkeypatch.setattr(trainer_module, "L", SimpleNamespace(Trainer=Fp16Trainer))


class NanGradients(L.Callback):
    """Makes every gradient NaN after the backward number ``which`` (0: the generator's, 1: the discriminator's) of
    batch ``batch`` (counted from 1)."""

    def __init__(self, batch: int, which: int = 0) -> None:
        self.batch, self.which = batch, which
        self.backwards: dict[int, int] = {}

    def on_after_backward(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        seen = module.batches_seen
        n = self.backwards.get(seen, 0)
        self.backwards[seen] = n + 1
        if (seen, n) == (self.batch, self.which):
            for p in module.parameters():
                if p.grad is not None:
                    p.grad.fill_(NAN)


TXT2IMG_ARGS = ["--config", "configs/tiny/txt2img.yaml", "trainer.max_steps=3", "train.ema_decay=0.999",
                "train.warmup_steps=10", "logging.tensorboard=false", "trainer.log_every_n_steps=1"]


def test_the_diffusion_stage_takes_no_schedule_or_ema_step_for_a_scaler_skip(tmp_path: Path,
                                                                              fp16_on_cpu: None) -> None:
    """A real fp16 run of the diffusion stage, NaN gradients in its second step: 3 steps, 2 LR-schedule and EMA
    steps; ``train/amp_skipped`` is logged beside ``train/skipped`` and the count is in the checkpoint."""
    trainer = run([*TXT2IMG_ARGS, "--run-dir", str(tmp_path)], callbacks=[NanGradients(batch=2)])
    m = trainer.lightning_module
    assert trainer.global_step == 3 and trainer.precision_plugin.scaler.get_scale() == 0.5
    assert schedule_steps(m) == 2 and int(m.model_ema.num_updates) == 2
    assert (m.guard.amp_skipped, m.guard.skipped) == (1, 0)
    assert logged(tmp_path, "train/amp_skipped") == {0: "0", 1: "1", 2: "1"}
    assert logged(tmp_path, "train/skipped") == {0: "0", 1: "0", 2: "0"}
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["step_guard"]["amp_skipped"] == 1


def test_the_autoencoder_discriminator_step_the_scaler_skips_takes_no_schedule_step(tmp_path: Path,
                                                                                    fp16_on_cpu: None) -> None:
    """The discriminator's step (``UncountedStep``, through the same scaler) with NaN gradients in the second batch:
    its schedule steps twice in 3 batches, the generator's three times; the skip is counted and logged."""
    trainer = run(["--config", "configs/tiny/autoencoder.yaml", "--run-dir", str(tmp_path), "trainer.max_steps=3",
                   "train.loss.params.disc_start=0", "train.latent_std_batches=0", "train.image_every_n_steps=0",
                   "logging.tensorboard=false"], callbacks=[NanGradients(batch=2, which=1)])
    m = trainer.lightning_module
    sched_g, sched_d = m.lr_schedulers()
    assert (int(sched_g.last_epoch), int(sched_d.last_epoch)) == (3, 2)
    assert (m.guard.amp_skipped, m.guard.skipped) == (1, 0)
    assert logged(tmp_path, "train/amp_skipped") == {0: "0", 1: "1", 2: "1"}
