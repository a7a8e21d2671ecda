"""Validation during training (``train.val_every_n_steps``): every stage logs its held-out metrics on the same
batches and noise each time, so the values change only with the weights."""
from __future__ import annotations

import math

import pytest

from ldm.cli.train import run
from ldm.registry import ConfigError
from ldm.training.logs import logged
from ldm.training.validation import Validation

FIXTURE = "tests/fixtures/emoji/emoji32-000000.tar"
VAL = [f"data.val={FIXTURE}", "data.val_num_samples=240", "train.val_batches=2", "trainer.log_every_n_steps=1"]


def test_diffusion_validation_is_logged_and_repeatable(tmp_path):
    trainer = run(["--config", "configs/tiny/txt2img.yaml", "--run-dir", str(tmp_path), "trainer.max_steps=4",
                   "train.val_every_n_steps=2", *VAL])
    loss, ema = logged(tmp_path, "val/loss"), logged(tmp_path, "val/loss_ema")
    assert sorted(loss) == sorted(ema) == [2, 4]
    assert all(math.isfinite(float(v)) and float(v) > 0 for v in [*loss.values(), *ema.values()])
    assert loss[2] != loss[4]  # the weights moved
    cb = next(c for c in trainer.callbacks if isinstance(c, Validation))
    module = trainer.lightning_module
    again = cb.validate(trainer, module, 4)  # same weights, same batches, same noise: the same value
    assert again["val/loss"] == pytest.approx(float(loss[4]), rel=1e-6)
    assert module.net.model.training  # validation leaves the U-Net in training mode


def test_autoencoder_validation_metrics(tmp_path):
    run(["--config", "configs/tiny/autoencoder.yaml", "--run-dir", str(tmp_path), "trainer.max_steps=2",
         "train.val_every_n_steps=2", *VAL])
    l1, psnr, kl = (logged(tmp_path, f"val/{k}") for k in ("l1", "psnr", "kl"))
    assert list(l1) == list(psnr) == list(kl) == [2]
    assert 0 < float(l1[2]) < 2 and 0 < float(psnr[2]) < 60 and float(kl[2]) >= 0


def test_clip_validation_metrics(tmp_path):
    run(["--config", "configs/tiny/clip.yaml", "--run-dir", str(tmp_path), "trainer.max_steps=2",
         "train.val_every_n_steps=1", *VAL])
    loss, acc = logged(tmp_path, "val/loss"), logged(tmp_path, "val/acc_i2t")
    assert sorted(loss) == sorted(acc) == [1, 2]
    assert all(0 <= float(a) <= 1 for a in acc.values()) and all(float(v) > 0 for v in loss.values())


def test_validation_needs_data(tmp_path):
    with pytest.raises(ConfigError, match="val_every_n_steps needs validation data"):
        run(["--config", "configs/tiny/txt2img.yaml", "--run-dir", str(tmp_path), "trainer.max_steps=1",
             "train.val_every_n_steps=1"])


def test_bad_validation_settings_are_named():
    with pytest.raises(ValueError, match="val_every_n_steps and train.val_batches must be positive"):
        Validation(0)


def test_a_resumed_run_does_not_validate_its_first_step_again(tmp_path, caplog):
    """With accumulation, the resumed run's first batch ends at the checkpoint's step: validated before the save, it
    is not validated again (the step is in the checkpoint's callback state)."""
    common = ["--config", "configs/tiny/txt2img.yaml", "--run-dir", str(tmp_path), "trainer.accumulate_grad_batches=2",
              "train.val_every_n_steps=2", "train.checkpoint.every_n_steps=2", *VAL]
    run(common + ["trainer.max_steps=2"])
    caplog.clear()
    with caplog.at_level("INFO", logger="ldm.training.validation"):
        run(common + ["trainer.max_steps=4", "--resume", "auto"])
    steps = [r.getMessage().split(":")[0] for r in caplog.records if "validation on" in r.getMessage()]
    assert steps == ["step 4"]
    assert sorted(logged(tmp_path, "val/loss")) == [2, 4]
