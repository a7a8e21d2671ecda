"""What a training run leaves in its run folder, checked on real tiny runs: the CSV log across ``--resume``."""
from __future__ import annotations

import csv

from ldm.cli.train import run
from ldm.training.logs import logged, resumable_csv_logger

FIXTURE = "tests/fixtures/emoji/emoji32-000000.tar"
COMMON = ["--config", "configs/tiny/txt2img.yaml", f"data.val={FIXTURE}", "data.val_num_samples=240",
          "train.val_batches=1", "train.val_every_n_steps=2", "train.checkpoint.every_n_steps=2",
          "trainer.log_every_n_steps=1", "logging.tensorboard=false"]


def test_a_resumed_run_keeps_the_validation_of_its_checkpoint_step(tmp_path):
    """Validation at step 4 is logged just before the step-4 checkpoint; the resumed run (whose first training row
    is at step 4 too) does not validate step 4 again, so its first save must not drop that row."""
    run([*COMMON, "--run-dir", str(tmp_path), "trainer.max_steps=4"])
    before = logged(tmp_path, "val/loss")
    assert sorted(before) == [2, 4]
    run([*COMMON, "--run-dir", str(tmp_path), "trainer.max_steps=6", "--resume", "auto"])
    after = logged(tmp_path, "val/loss")
    assert sorted(after) == [2, 4, 6]
    assert after[4] == before[4]
    with open(tmp_path / "logs" / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert steps == list(range(6))  # every training step once, none twice


def test_rows_logged_after_the_checkpoint_go_series_by_series(tmp_path):
    """Each series the resumed process logs replaces the old one from its first step there, whatever the order the
    rows were logged and saved in: its training row of step 4 replaces the old training rows from 4 on at once, the
    validation row of step 3 that the interrupted run logged after its checkpoint goes when the resumed run logs
    step 3's validation again, and the validation logged before the checkpoint (step 2) stays. (Under gradient
    accumulation ``val/*`` once ran behind training rows at the batch count; both now count optimizer steps.)"""
    (tmp_path / "logs").mkdir()
    rows = ["3,0.3,", "2,,0.2", "4,0.4,", "5,0.5,", "3,,0.35"]  # checkpoint after "2,,0.2"
    (tmp_path / "logs" / "metrics.csv").write_text("step,train/loss,val/loss\n" + "\n".join(rows) + "\n")
    logger = resumable_csv_logger(tmp_path)
    logger.log_metrics({"train/loss": 0.45}, step=4)
    logger.save()
    assert logged(tmp_path, "train/loss") == {3: "0.3", 4: "0.45"}
    logger.log_metrics({"val/loss": 0.36}, step=3)
    logger.save()
    assert logged(tmp_path, "val/loss") == {2: "0.2", 3: "0.36"}
    with open(tmp_path / "logs" / "metrics.csv") as f:
        assert len(list(csv.DictReader(f))) == 4  # the old rows left empty are gone


def test_a_run_ending_between_saves_checkpoints_its_last_step(tmp_path):
    """max_steps 3 with a save every 2 steps: the run ends with last.ckpt at step 3 (it held step 2, so --resume
    redid step 3), and a resume to 5 continues from 3."""
    import torch

    run([*COMMON, "--run-dir", str(tmp_path), "trainer.max_steps=3"])
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 3
    run([*COMMON, "--run-dir", str(tmp_path), "trainer.max_steps=5", "--resume", "auto"])
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 5
    with open(tmp_path / "logs" / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert steps == list(range(5))  # step 3 trained once


def test_a_new_run_in_a_used_run_folder_starts_its_csv_log_afresh(tmp_path):
    """A run that does not resume (the config's default run folder trained again, or ``--resume auto`` before the
    first checkpoint) in a folder holding an earlier run's ``logs/metrics.csv``: none of those rows stay. Series by
    series, the old rows of every series the new run logs later or not at all (here ``val/*``, and ``train/loss``
    before the new run's first row) stayed, mixed into the new run's log as if it had logged them."""
    from omegaconf import OmegaConf

    from ldm.training.trainer import build_loggers

    (tmp_path / "logs").mkdir()
    old = ["0,0.9,", "1,0.8,", "2,,0.7", "3,0.6,"]
    (tmp_path / "logs" / "metrics.csv").write_text("step,train/loss,val/loss\n" + "\n".join(old) + "\n")
    (logger,) = build_loggers(OmegaConf.create({"logging": {"tensorboard": False}}), tmp_path, resuming=False)
    logger.log_metrics({"train/loss": 0.5}, step=1)
    logger.save()
    assert logged(tmp_path, "train/loss") == {1: "0.5"}
    assert logged(tmp_path, "val/loss") == {}
    (logger,) = build_loggers(OmegaConf.create({"logging": {"tensorboard": False}}), tmp_path, resuming=True)
    logger.log_metrics({"train/loss": 0.4}, step=2)
    logger.save()
    assert logged(tmp_path, "train/loss") == {1: "0.5", 2: "0.4"}  # a resumed run keeps what came before


def test_a_run_lightning_resumes_by_itself_under_slurm_counts_as_resuming(tmp_path, monkeypatch):
    """Under SLURM, ``trainer.fit`` without a checkpoint restores the run folder's ``hpc_ckpt_<N>.ckpt`` by itself:
    such a run continues its CSV log (and W&B run) like one given ``--resume``, rather than starting them afresh."""
    import ldm.training.preemption as preemption
    from ldm.cli.train import lightning_resume_path

    (tmp_path / "hpc_ckpt_x.ckpt").write_bytes(b"")  # not a name Lightning restores
    monkeypatch.setattr(preemption, "slurm_detected", lambda: True)
    assert lightning_resume_path(tmp_path) is None
    (tmp_path / "hpc_ckpt_2.ckpt").write_bytes(b"")
    assert lightning_resume_path(tmp_path) is not None
    monkeypatch.setattr(preemption, "slurm_detected", lambda: False)
    assert lightning_resume_path(tmp_path) is None
