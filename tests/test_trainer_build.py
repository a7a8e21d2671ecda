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


def test_lightning_does_not_warn_of_what_training_does_by_design(tmp_path, caplog):
    """Every save under manual optimization made Lightning warn that the state is the one after the optimizer step,
    which is the state a resume continues from; the checkpoints are written, the warning is not. Its count of
    modules in eval mode (the frozen autoencoder and text encoder) becomes one INFO line that names them."""
    import logging
    import warnings

    from ldm.cli.train import run

    caplog.set_level(logging.INFO, logger="ldm.training.callbacks")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        run(["--config", "configs/tiny/txt2img.yaml", "--run-dir", str(tmp_path), "data.batch_size=4",
             "trainer.max_steps=2", "train.checkpoint.every_n_steps=1"])
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step*.ckpt")) == ["step00000001.ckpt",
                                                                                   "step00000002.ckpt"]
    assert not [w for w in seen if "manual optimization" in str(w.message) or "in eval mode" in str(w.message)]
    info = [r.getMessage() for r in caplog.records if "in eval mode while training" in r.getMessage()]
    assert len(info) == 1 and "net.first_stage_model (" in info[0] and "net.cond_stage_model (" in info[0]
    assert "net.model" not in info[0]
    assert not [r for r in caplog.records if r.levelname == "WARNING" and r.name == "ldm.training.callbacks"]


def test_a_trainable_module_in_eval_mode_is_named_in_a_warning(caplog):
    import torch

    from ldm.training.callbacks import report_eval_modules

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Dropout(), torch.nn.Linear(2, 2)))
    net[1].eval()  # the dropout and the linear layer; the linear one is trained
    assert report_eval_modules(net) == ["1.1"]
    assert "1.1 is in eval mode but has trainable parameters" in caplog.text
    net[1][1].requires_grad_(False)
    assert report_eval_modules(net) == []


def test_the_csv_log_keeps_an_earlier_part_and_replaces_steps_logged_after_its_checkpoint(tmp_path):
    from ldm.training.logs import logged, resumable_csv_logger

    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "metrics.csv").write_text("step,train/loss\n" + "".join(f"{s},0.{s}\n" for s in range(6)))
    logger = resumable_csv_logger(tmp_path)  # a run resumed from its step-3 checkpoint; steps 3-5 were logged after it
    logger.log_metrics({"train/loss": 0.75, "val/loss": 0.5}, step=3)
    logger.save()
    assert logged(tmp_path, "train/loss") == {0: "0.0", 1: "0.1", 2: "0.2", 3: "0.75"}
    assert logged(tmp_path, "val/loss") == {3: "0.5"}  # a new key widens the header; the old rows stay
    logger.log_metrics({"train/loss": 0.25}, step=4)
    logger.save()
    assert logged(tmp_path, "train/loss") == {0: "0.0", 1: "0.1", 2: "0.2", 3: "0.75", 4: "0.25"}
    assert not (tmp_path / "logs" / "metrics.csv.tmp").exists()


def test_a_resumed_run_logs_into_the_same_wandb_run(tmp_path):
    """W&B: a new id per new run, saved in the run folder; a resumed process continues that run (resume="allow")."""
    from lightning.pytorch.loggers import WandbLogger

    from ldm.training.trainer import build_loggers

    cfg = config(logging={"csv": False, "tensorboard": False, "wandb": {"project": "p", "mode": "offline"}})

    def wandb_id(resuming):
        (logger,) = build_loggers(cfg, tmp_path, resuming)
        assert isinstance(logger, WandbLogger) and logger._wandb_init["resume"] == "allow"
        return logger.version

    first = wandb_id(False)
    assert (tmp_path / "wandb_run_id").read_text().strip() == first
    assert wandb_id(True) == first  # --resume: the same run
    second = wandb_id(False)  # a new run in the same folder: a new W&B run
    assert second != first and wandb_id(True) == second


def test_only_the_first_nodes_rank_zero_writes_the_wandb_run_id(tmp_path, monkeypatch):
    """Launched by Lightning on several nodes (NODE_RANK set, no RANK), each node's first process has local rank 0;
    the second node's wrote its own id into the shared run folder, so a resume logged into another W&B run."""
    from ldm.training.trainer import wandb_run_id

    monkeypatch.setenv("NODE_RANK", "1")
    wandb_run_id(tmp_path, resuming=False)
    assert not (tmp_path / "wandb_run_id").exists()
    monkeypatch.setenv("NODE_RANK", "0")
    first = wandb_run_id(tmp_path, resuming=False)
    assert (tmp_path / "wandb_run_id").read_text().strip() == first


@pytest.mark.parametrize("strategy, stage", [("ddp", "diffusion"), ("auto", "diffusion"), ("ddp", "autoencoder"),
                                             ("ddp_spawn", "diffusion")])
def test_ddp_holds_its_gradients_in_its_buckets_and_bounds_its_collectives(tmp_path, strategy, stage):
    """Named by us or chosen by Lightning (auto with two devices), DDP gets gradient views into its buckets (no second
    copy of the gradients) and train.dist_timeout_s; the autoencoder's DDP also finds the unused discriminator."""
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    cfg = config(trainer={"devices": 2, "strategy": strategy}, train={"stage": stage, "dist_timeout_s": 42})
    ddp = build_trainer(cfg, tmp_path).strategy
    assert isinstance(ddp, DDPStrategy)
    assert ddp._ddp_kwargs["gradient_as_bucket_view"] is True
    assert ddp._ddp_kwargs.get("find_unused_parameters", False) is (stage == "autoencoder")
    assert ddp._timeout == timedelta(seconds=42)


@pytest.mark.parametrize("override, match", [
    ("trainer.max_steps=abc", r"trainer.max_steps: expected an int ≥ -1, got 'abc'"),
    ("trainer.max_steps=2.5", r"trainer.max_steps: expected an int"),
    ("trainer.num_nodes=0", r"trainer.num_nodes: expected an int ≥ 1"),
    ("trainer.log_every_n_steps=0", r"trainer.log_every_n_steps")])
def test_trainer_values_are_checked_by_name(tmp_path, override, match):
    from ldm.config import load_config
    from ldm.registry import ConfigError
    from ldm.training.trainer import build_trainer

    with pytest.raises(ConfigError, match=match):
        build_trainer(load_config("configs/tiny/txt2img.yaml", [override]), tmp_path)
