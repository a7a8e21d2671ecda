"""The training rows under gradient accumulation and the CSV log across ``--resume``, on real tiny runs: one row per
optimizer step (the mean over its batches) on the step axis of ``val/*``, and each (step, metric) once in a resumed
run's ``logs/metrics.csv``, as an uninterrupted run writes it."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

import ldm.training.step_log as step_log
from ldm.cli.train import run
from ldm.training.logs import logged, resumable_csv_logger

FIXTURE = "tests/fixtures/emoji/emoji32-000000.tar"
TINY = ["--config", "configs/tiny/txt2img.yaml", f"data.val={FIXTURE}", "data.val_num_samples=240",
        "train.val_batches=1", "logging.tensorboard=false"]
ACCUMULATING = [*TINY, "data.batch_size=2", "trainer.accumulate_grad_batches=2"]


def cells(run_dir: Path) -> dict[tuple[int, str], str]:
    """(step, metric) -> value of the run's CSV log, but the timing (``train/img_per_s``, which a process's first
    batch has not); a (step, metric) twice fails."""
    out: dict[tuple[int, str], str] = {}
    with open(run_dir / "logs" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key not in ("step", "train/img_per_s") and value:
                    assert (int(row["step"]), key) not in out, f"{key} at step {row['step']} twice"
                    out[int(row["step"]), key] = value
    return out


def test_accumulated_batches_log_one_row_per_optimizer_step_holding_their_mean(tmp_path, monkeypatch):
    """k=2, 4 optimizer steps (8 batches), a row every 2 steps: ``train/loss`` and the learning rate at steps 1 and 3,
    the axis of ``val/*`` (2, 4), each loss the mean of its step's two batches. It logged every other *batch*,
    under the batch count (steps 1, 3, 5, 7), the last batch's loss alone."""
    import ldm.diffusion.lightning as diffusion

    losses: list[torch.Tensor] = []
    real = diffusion.guarded_step

    def recording(module, optimizer, loss, *args, **kwargs):
        losses.append(loss.detach().float().clone())
        return real(module, optimizer, loss, *args, **kwargs)

    monkeypatch.setattr(diffusion, "guarded_step", recording)
    trainer = run([*ACCUMULATING, "--run-dir", str(tmp_path), "trainer.max_steps=4", "trainer.log_every_n_steps=2",
                   "train.val_every_n_steps=2"])
    assert trainer.global_step == 4 and len(losses) == 8
    rows = logged(tmp_path, "train/loss")
    assert sorted(rows) == sorted(logged(tmp_path, "lr-AdamW")) == [1, 3]
    assert sorted(logged(tmp_path, "val/loss")) == [2, 4]
    for step, text in rows.items():
        window = losses[2 * step:2 * step + 2]
        assert float(text) == pytest.approx(float((window[0] + window[1]) / 2), rel=1e-6)
        assert float(text) != pytest.approx(float(window[1]), rel=1e-4)  # not the last batch's alone


def test_an_accumulating_run_resumed_after_a_crash_logs_the_rows_of_an_uninterrupted_one(tmp_path):
    """k=2, a row every 4 steps, validation every step, checkpoints every 2. The run that fails in step 3 (after its
    validation at 3, logged after the step-2 checkpoint) and resumes from step 2 ends with the uninterrupted run's
    log. With the training rows at the batch count, the resumed file was cut at the rows of batch 3 (step 3 on that
    axis, the step of the resumed run's first validation): the validation of step 2 and the rows of batch 3, logged
    before the checkpoint, were lost."""
    common = [*ACCUMULATING, "trainer.max_steps=4", "trainer.log_every_n_steps=4", "train.val_every_n_steps=1",
              "train.checkpoint.every_n_steps=2"]
    run([*common, "--run-dir", str(tmp_path / "whole")])
    with pytest.raises(RuntimeError, match="debug_fail"):
        run([*common, "--run-dir", str(tmp_path / "part"), "train.debug_fail.rank=0", "train.debug_fail.step=3"])
    run([*common, "--run-dir", str(tmp_path / "part"), "--resume", "auto"])
    whole = cells(tmp_path / "whole")
    assert cells(tmp_path / "part") == whole
    assert {s for s, k in whole if k == "train/loss"} == {3}
    assert {s for s, k in whole if k == "val/loss"} == {1, 2, 3, 4}


class Event:
    """A CUDA event stand-in: passes when the next copy starts (a training row reaches the host a log step late, after
    the ``val/*`` rows logged in between), or when waited for (checkpoints, the end of training)."""

    def __init__(self) -> None:
        self.passed = False

    def query(self) -> bool:
        return self.passed

    def synchronize(self) -> None:
        self.passed = True


def test_sparse_logging_resumes_each_row_once_when_training_rows_arrive_late(tmp_path, monkeypatch):
    """A row every 2 steps, validation every step, checkpoints every 3, the loss read as from a GPU (it arrives with
    the next log step's copy). The run stopped at 3 and resumed ends with the uninterrupted run's rows, each once.
    The resumed process's first save held its training rows of step 3 and, come in between, ``val/*`` of steps 4 and
    5: the cut of every series at their first step (3) dropped the validation of step 3, logged before the checkpoint,
    and the training row of step 1, which had reached the host after it."""
    events: list[Event] = []

    def copy(values: torch.Tensor) -> tuple[torch.Tensor, Event]:
        for event in events:
            event.passed = True
        events.append(Event())
        return values.clone(), events[-1]

    monkeypatch.setattr(step_log, "copy_to_host", copy)
    monkeypatch.setattr(step_log, "on_host", lambda t: False)  # the loss stands for a GPU tensor
    common = [*TINY, "trainer.log_every_n_steps=2", "train.val_every_n_steps=1", "train.checkpoint.every_n_steps=3"]
    run([*common, "--run-dir", str(tmp_path / "whole"), "trainer.max_steps=6"])
    run([*common, "--run-dir", str(tmp_path / "part"), "trainer.max_steps=3"])
    run([*common, "--run-dir", str(tmp_path / "part"), "trainer.max_steps=6", "--resume", "auto"])
    whole = cells(tmp_path / "whole")
    assert {s for s, k in whole if k == "train/loss"} == {1, 3, 5}
    assert {s for s, k in whole if k == "val/loss"} == {1, 2, 3, 4, 5, 6}
    assert cells(tmp_path / "part") == whole


def test_the_rows_logged_before_a_checkpoint_are_on_disk_with_it(tmp_path, monkeypatch):
    """Sparse logging (no training row in 4 steps), validation every step: a run that dies in step 2, after the
    step-2 checkpoint, without saving its logs (as under SIGKILL) and resumes ends with the uninterrupted run's log.
    The validation of steps 1 and 2 waited in the logger's memory for the next training row and was lost (the resumed
    run does not validate them again)."""
    from lightning.pytorch.loggers import CSVLogger

    common = [*TINY, "trainer.max_steps=4", "trainer.log_every_n_steps=100", "train.val_every_n_steps=1",
              "train.checkpoint.every_n_steps=2"]
    run([*common, "--run-dir", str(tmp_path / "whole")])
    with monkeypatch.context() as m:
        m.setattr(CSVLogger, "finalize", lambda self, status: None)  # killed: what was not saved is lost
        with pytest.raises(RuntimeError, match="debug_fail"):
            run([*common, "--run-dir", str(tmp_path / "part"), "train.debug_fail.rank=0", "train.debug_fail.step=2"])
    run([*common, "--run-dir", str(tmp_path / "part"), "--resume", "auto"])
    whole = cells(tmp_path / "whole")
    assert cells(tmp_path / "part") == whole
    assert {s for s, k in whole if k == "val/loss"} == {1, 2, 3, 4}


def test_a_resumed_process_replaces_each_series_from_its_own_first_step(tmp_path):
    """Sparse logging: the interrupted run logged a training row at 1, ``val/*`` at 2 (then the checkpoint of step 2)
    and 3 (after it, before its next training row). The resumed process saves its training row of step 3 first, then
    validates step 3 again: the old validation of step 3 goes, that of step 2 stays, each once. The cut at the new
    rows' first step (3) and keys (training only) kept the old validation of step 3 and wrote it a second time."""
    (tmp_path / "logs").mkdir()
    rows = ["1,0.5,", "2,,0.2", "3,,0.35"]
    (tmp_path / "logs" / "metrics.csv").write_text("step,train/loss,val/loss\n" + "\n".join(rows) + "\n")
    logger = resumable_csv_logger(tmp_path)
    logger.log_metrics({"train/loss": 0.45}, step=3)
    logger.save()
    logger.log_metrics({"val/loss": 0.36}, step=3)
    logger.save()
    assert cells(tmp_path) == {(1, "train/loss"): "0.5", (2, "val/loss"): "0.2", (3, "train/loss"): "0.45",
                               (3, "val/loss"): "0.36"}


def test_window_means_leave_states_and_numbers_as_the_closing_batch_has_them():
    """Per-batch tensors are averaged over the window; a tensor named in ``last`` (CLIP's temperature, a weight) and
    numbers (the learning rate) are the closing batch's; nothing before the window's last batch."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    module = SimpleNamespace(config=OmegaConf.create({"trainer": {"accumulate_grad_batches": 3}}), batches_seen=0)
    seen = []
    for i in range(3):
        module.batches_seen += 1
        values = {"train/loss": torch.tensor(float(i)), "train/logit_scale": torch.tensor(10.0 + i),
                  "train/lr": 0.1 * i}
        seen.append(step_log.over_window(module, values, 3, last=("train/logit_scale",)))
    assert seen[:2] == [None, None]
    assert {k: float(v) for k, v in seen[2].items()} == pytest.approx(
        {"train/loss": 1.0, "train/logit_scale": 12.0, "train/lr": 0.2})


def test_an_accumulated_row_gives_the_throughput_of_its_whole_step(tmp_path, monkeypatch):
    """k=2, the first batch of each step 1 s, the second (the optimizer step's) 3 s: ``train/img_per_s`` is the step's
    4 images over its 4 s. It was the closing batch's own rate (2 images in 3 s), which on the paths that read the
    host at the step (fp16, SGD, the CPU) holds the wait for the whole window's queued work: up to k times too low."""
    import itertools
    from types import SimpleNamespace

    import ldm.diffusion.lightning as diffusion

    ticks = itertools.accumulate(itertools.cycle([1.0, 3.0]))  # the clock at each batch's end: 1, 4, 5, 8, ...
    monkeypatch.setattr(diffusion, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    run([*ACCUMULATING, "--run-dir", str(tmp_path), "trainer.max_steps=4", "trainer.log_every_n_steps=1"])
    rates = {step: float(value) for step, value in logged(tmp_path, "train/img_per_s").items()}
    assert rates == {1: 1.0, 2: 1.0, 3: 1.0}  # step 0 has no step before it to time from
