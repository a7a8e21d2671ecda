"""The TensorBoard event files of a run folder (``<run_dir>/tb/``) across ``--resume``, read back from disk as
TensorBoard reads them (``EventAccumulator``): each point once, the interrupted run's points after its checkpoint
hidden, those before it kept."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm.cli.train import run

FIXTURE = "tests/fixtures/emoji/emoji32-000000.tar"
COMMON = ["--config", "configs/tiny/txt2img.yaml", f"data.val={FIXTURE}", "data.val_num_samples=240",
          "train.val_batches=1", "train.val_every_n_steps=2", "train.checkpoint.every_n_steps=2",
          "trainer.log_every_n_steps=1", "logging.csv=false", "logging.tensorboard=true"]


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of the run's TensorBoard scalars, in the order TensorBoard shows them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def steps(series: list[tuple[int, float]]) -> list[int]:
    return [step for step, _ in series]


def assert_each_step_once(logged: dict[str, list[tuple[int, float]]]) -> None:
    for tag, series in logged.items():
        assert all(a < b for a, b in zip(steps(series), steps(series)[1:])), f"{tag}: steps {steps(series)}"


def test_a_run_resumed_after_a_crash_shows_the_points_of_an_uninterrupted_one(tmp_path):
    """Checkpoints every 2 steps, validation every 2; the run fails in step 5, after the step-4 checkpoint, having
    logged the training rows of step 4 and the learning rate of step 5 after it. Resumed, every series holds each
    step once, with the uninterrupted run's values: the interrupted run's training rows of step 4 doubled those of
    the resumed run (its event file was read after theirs: zig-zag curves), and the validation of step 4, logged
    before the checkpoint and not again, stays. The throughput of step 4 goes: the resumed process has none for its
    first step."""
    run([*COMMON, "--run-dir", str(tmp_path / "whole"), "trainer.max_steps=6"])
    part = tmp_path / "part"
    with pytest.raises(RuntimeError, match="debug_fail"):
        run([*COMMON, "--run-dir", str(part), "trainer.max_steps=6", "train.debug_fail.rank=0",
             "train.debug_fail.step=5"])
    killed = scalars(part)
    assert steps(killed["train/loss"]) == [0, 1, 2, 3, 4] and steps(killed["lr-AdamW"]) == [0, 1, 2, 3, 4, 5]
    assert steps(killed["val/loss"]) == [2, 4]
    run([*COMMON, "--run-dir", str(part), "trainer.max_steps=6", "--resume", "auto"])
    whole, resumed = scalars(tmp_path / "whole"), scalars(part)
    assert_each_step_once(resumed)
    assert steps(resumed["train/loss"]) == list(range(6)) and steps(resumed["val/loss"]) == [2, 4, 6]
    assert resumed["val/loss"][1] == killed["val/loss"][1]  # logged before the checkpoint, kept
    assert steps(resumed.pop("train/img_per_s")) == [1, 2, 3, 5]
    whole.pop("train/img_per_s")
    assert resumed == whole


def test_a_new_run_in_a_used_run_folder_hides_the_earlier_runs_points(tmp_path):
    """A run that does not resume, in a folder an earlier (longer) run logged in: TensorBoard shows its points alone,
    as its CSV log starts afresh. The earlier run's steps 2 and 3 and its validation of step 4 showed as its own."""
    run([*COMMON, "--run-dir", str(tmp_path), "trainer.max_steps=4"])
    run([*COMMON, "--run-dir", str(tmp_path), "trainer.max_steps=2"])
    logged = scalars(tmp_path)
    assert_each_step_once(logged)
    assert steps(logged["train/loss"]) == [0, 1] and steps(logged["val/loss"]) == [2]


def test_the_points_of_the_checkpoint_step_logged_before_it_stay_and_the_later_ones_go(tmp_path):
    """The interrupted run logged, at step 2, its validation and a sample image before the checkpoint (saved at
    t=15) and its training row after it, then step 3. Resumed from step 2 the validation and the image stay, with
    their wall times, and the training row of step 2 is the resumed run's alone."""
    import numpy as np
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from ldm.training.logs import ResumePoint, resumable_tensorboard_logger

    old = SummaryWriter(str(tmp_path / "tb"), filename_suffix=".0")
    old.add_scalar("train/loss", 0.5, 1, walltime=5)
    old.add_scalar("val/loss", 0.25, 2, walltime=10)
    old.add_image("samples", np.zeros((3, 4, 4), dtype=np.uint8), 2, walltime=11)
    old.add_scalar("train/loss", 0.375, 2, walltime=20)
    old.add_scalar("train/loss", 0.125, 3, walltime=30)
    old.close()
    logger = resumable_tensorboard_logger(tmp_path, resuming=True, resumed_from=ResumePoint(2, saved_at=15.0))
    logger.log_metrics({"train/loss": 0.625}, step=2)
    logger.finalize("success")
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 0.5), (2, 0.625)]
    assert [(e.step, e.wall_time, e.value) for e in acc.Scalars("val/loss")] == [(2, 10.0, 0.25)]
    assert [(e.step, e.wall_time) for e in acc.Images("samples")] == [(2, 11.0)]


def test_the_resume_point_is_the_checkpoint_lightning_restores_under_slurm(tmp_path, monkeypatch):
    """Without ``--resume`` under SLURM Lightning restores ``hpc_ckpt_<N>.ckpt`` of the greatest N by itself: its step
    and save time are where the logs continue; elsewhere, a new run. A given checkpoint's are read from it."""
    import ldm.training.preemption as preemption
    from ldm.cli.train import restored_checkpoint, resume_point
    from ldm.training.logs import ResumePoint

    torch.save({"global_step": 3, "ldm_saved_at": 100.0}, tmp_path / "hpc_ckpt_1.ckpt")
    torch.save({"global_step": 7, "ldm_saved_at": 200.0}, tmp_path / "hpc_ckpt_2.ckpt")
    torch.save({"global_step": 5}, tmp_path / "old.ckpt")  # an ldm that recorded no save time
    monkeypatch.setattr(preemption, "slurm_detected", lambda: True)
    assert resume_point(restored_checkpoint(None, tmp_path)) == ResumePoint(7, 200.0)
    assert resume_point(restored_checkpoint(str(tmp_path / "hpc_ckpt_1.ckpt"), tmp_path)) == ResumePoint(3, 100.0)
    assert resume_point(restored_checkpoint(str(tmp_path / "old.ckpt"), tmp_path)) == ResumePoint(5, None)
    monkeypatch.setattr(preemption, "slurm_detected", lambda: False)
    assert resume_point(restored_checkpoint(None, tmp_path)) is None
