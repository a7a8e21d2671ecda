"""A run says at its start when its disk cannot hold its checkpoints (ldm/training/disk.py), with the numbers."""
from __future__ import annotations

import logging
import shutil

import pytest
import torch
from torch import nn

from ldm.cli.train import run
from ldm.training.disk import checkpoint_bytes, copies_on_disk, warn_if_short


def frozen_and_trained() -> nn.Module:
    m = nn.Sequential(nn.Linear(10, 20), nn.Linear(20, 5).half())  # 220 fp32 + 105 fp16 values
    m[1].requires_grad_(False)
    m.register_buffer("steps", torch.zeros(3, dtype=torch.int64))
    return m


def test_a_checkpoint_is_the_state_dict_and_two_fp32_moments_per_trained_value():
    assert checkpoint_bytes(frozen_and_trained()) == (220 * 4 + 105 * 2 + 3 * 8) + 2 * 4 * 220


@pytest.mark.parametrize("keep_last, copies", [(3, 5), (0, 2), (-1, 3), (1, 3)])
def test_copies_on_disk_count_last_ckpt_and_the_one_being_written(keep_last, copies):
    assert copies_on_disk(keep_last) == copies


def with_free(monkeypatch, tmp_path, free: int) -> None:
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=free))


@pytest.mark.parametrize("short, warned", [(1, True), (0, False)])
def test_the_warning_names_the_folder_and_the_sizes(tmp_path, monkeypatch, caplog, short, warned):
    with_free(monkeypatch, tmp_path, 5 * 2874 - short)  # 5 copies of the checkpoint above
    with caplog.at_level(logging.WARNING, logger="ldm.training.disk"):
        assert warn_if_short(tmp_path, frozen_and_trained(), keep_last=3) is warned
    assert bool(caplog.records) is warned
    if warned:
        assert f"{tmp_path} has 0.00 GB free" in caplog.text and "keep_last=3" in caplog.text


def test_a_training_run_warns_before_its_first_step(tmp_path, monkeypatch, caplog):
    """The tiny config's run on a disk with 1 MB free: the warning comes, the run goes on (nothing is saved in
    one step here but last.ckpt, which fits the real disk)."""
    with_free(monkeypatch, tmp_path, 10**6)
    with caplog.at_level(logging.WARNING, logger="ldm.training.disk"):
        run(["--config", "configs/tiny/txt2img.yaml", "--run-dir", str(tmp_path), "trainer.max_steps=1",
             "trainer.accelerator=cpu", "sample.every_n_steps=null", "train.checkpoint.keep_last=3"])
    assert "has 0.00 GB free" in caplog.text and "up to 5 at once" in caplog.text
