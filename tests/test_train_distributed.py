"""Multi-process training on the CPU (gloo): a 2-rank DDP run completes; a rank that raises ends the job quickly."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ldm.checkpoint import read_state_dict
from ldm.training.logs import logged
from ranks import run_job, why

ROOT = Path(__file__).resolve().parents[1]
CMD = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", "configs/tiny/txt2img.yaml",
       "trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu"]


def run(tmp: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_job([*CMD, "--run-dir", str(tmp), *extra], tmp, ROOT, timeout)


VALIDATING = ("train.val_every_n_steps=2", "data.val=tests/fixtures/emoji/emoji32-000000.tar",
              "data.val_num_samples=240", "train.val_batches=2", "trainer.log_every_n_steps=1")


@pytest.mark.parametrize("extra", [(), ("trainer.accumulate_grad_batches=2", *VALIDATING)],
                         ids=["plain", "accumulating-validating"])
def test_two_rank_ddp_run_trains_and_exports_once(tmp_path, extra):
    """Also with gradient accumulation (the first batch of each window backpropagates under DDP's no_sync) and
    validation (each rank its own batches, the sums all-reduced: 2 ranks × 2 batches × 4 samples)."""
    r = run(tmp_path, "trainer.max_steps=3", *extra)
    assert r.returncode == 0, why(r)
    if extra:
        assert sorted(logged(tmp_path, "val/loss")) == [2, 3] and "validation on 16 samples" in r.stderr
    sd, meta = read_state_dict(tmp_path / "model.safetensors")
    assert "ldm_config" in meta and all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())
    assert len(list((tmp_path / "checkpoints").glob("*.ckpt"))) >= 1


def test_a_rank_that_raises_ends_the_job_nonzero_quickly(tmp_path):
    t0 = time.time()
    r = run(tmp_path, "trainer.max_steps=50", "train.debug_fail.rank=1", "train.debug_fail.step=2",
            "train.dist_timeout_s=60", timeout=240)
    assert r.returncode != 0
    assert "injected failure on rank 1" in r.stderr
    assert time.time() - t0 < 200


def test_noise_differs_by_rank_and_step_but_repeats():
    from types import SimpleNamespace

    from ldm.training.optim import step_generator

    def gen(rank, step):
        m = SimpleNamespace(global_rank=rank, global_step=step, device=torch.device("cpu"), trainer=object())
        return torch.randn(4, generator=step_generator(m, 0))

    assert torch.equal(gen(0, 5), gen(0, 5))
    assert not torch.equal(gen(0, 5), gen(1, 5)) and not torch.equal(gen(0, 5), gen(0, 6))
