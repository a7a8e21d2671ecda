"""Run-management options reach their behaviour with the user's value (not accepted and silently ignored)."""
from __future__ import annotations

from datetime import timedelta

from lightning.pytorch.strategies import DDPStrategy

from ldm.config import load_config
from ldm.training.trainer import build_trainer

TINY = "configs/tiny/txt2img.yaml"


def test_dist_timeout_reaches_the_ddp_lightning_picks_for_several_devices(tmp_path):
    """``trainer.strategy`` left at ``auto`` with several devices is DDP too: ``train.dist_timeout_s`` must bound its
    collectives (it was Lightning's default, 30 minutes)."""
    for strategy in ("auto", "ddp", "ddp_spawn"):
        cfg = load_config(TINY, ["train.dist_timeout_s=7", "trainer.devices=2", f"trainer.strategy={strategy}"])
        trainer = build_trainer(cfg, tmp_path)
        assert isinstance(trainer.strategy, DDPStrategy)
        assert trainer.strategy._timeout == timedelta(seconds=7), strategy
