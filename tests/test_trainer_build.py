"""The Lightning Trainer built from a config: the progress bar reads metrics back only every N steps."""
from __future__ import annotations

import pytest
from lightning.pytorch.callbacks import TQDMProgressBar
from omegaconf import OmegaConf

from ldm.registry import ConfigError
from ldm.training.trainer import build_trainer


def config(**sections):
    base = {"train": {"stage": "diffusion"}, "trainer": {"accelerator": "cpu", "devices": 1}}
    for k, v in sections.items():
        base.setdefault(k, {}).update(v)
    return OmegaConf.create(base)


def bars(trainer):
    return [c for c in trainer.callbacks if isinstance(c, TQDMProgressBar)]


def test_progress_bar_redraws_every_ten_steps_by_default_and_as_configured(tmp_path):
    assert [b.refresh_rate for b in bars(build_trainer(config(), tmp_path))] == [10]
    cfg = config(logging={"progress_every_n_steps": 50})
    assert [b.refresh_rate for b in bars(build_trainer(cfg, tmp_path))] == [50]
    assert bars(build_trainer(config(trainer={"enable_progress_bar": False}), tmp_path)) == []


@pytest.mark.parametrize("bad", [0, -3, "often", 2.5])
def test_bad_progress_interval_is_named(tmp_path, bad):
    with pytest.raises(ConfigError, match="logging.progress_every_n_steps"):
        build_trainer(config(logging={"progress_every_n_steps": bad}), tmp_path)


@pytest.mark.parametrize("overrides, steps", [
    (["trainer.max_steps=-1", "trainer.max_epochs=1"], 15),  # 240 fixture samples / batch 16
    (["trainer.max_steps=-1", "trainer.max_epochs=2", "trainer.accumulate_grad_batches=4"], 8),  # ⌈30 / 4⌉
    (["trainer.max_steps=3", "trainer.max_epochs=1"], 3),  # whichever limit comes first
])
def test_max_epochs_ends_the_endless_stream(tmp_path, overrides, steps):
    """The stages read one endless stream of epochs, so trainer.max_epochs alone used to train forever."""
    from ldm.cli.train import run

    trainer = run(["--config", "configs/tiny/txt2img.yaml", "--run-dir", str(tmp_path), "data.batch_size=16",
                   "train.checkpoint.every_n_steps=100", *overrides])
    assert trainer.global_step == steps


def test_a_run_without_any_limit_is_refused(tmp_path):
    from ldm.cli.train import run

    with pytest.raises(ConfigError, match="set trainer.max_steps or trainer.max_epochs"):
        run(["--config", "configs/tiny/txt2img.yaml", "--run-dir", str(tmp_path), "trainer.max_steps=-1"])


def test_step_checkpoints_save_without_lightnings_manual_optimization_warning(tmp_path):
    """Every save under manual optimization made Lightning warn that the state is the one after the optimizer step,
    which is the state a resume continues from; the checkpoints are written, the warning is not."""
    import warnings

    from ldm.cli.train import run

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        run(["--config", "configs/tiny/txt2img.yaml", "--run-dir", str(tmp_path), "data.batch_size=4",
             "trainer.max_steps=2", "train.checkpoint.every_n_steps=1"])
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step*.ckpt")) == ["step00000001.ckpt",
                                                                                   "step00000002.ckpt"]
    assert not [w for w in seen if "manual optimization" in str(w.message)]
