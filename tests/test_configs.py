"""Every training config under configs/ runs a real optimizer step on the fixture shards (CPU, 32 px)."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ldm.cli.train import run
from ldm.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml"))
TRAINING = [c for c in CONFIGS if "train" in OmegaConf.load(ROOT / c)]
FULL_SIZE = {"configs/diffusion/sd-v1-finetune.yaml", "configs/diffusion/sd-v2-finetune.yaml"}

GENERIC = ["data.train=tests/fixtures/emoji/emoji32-000000.tar", "data.num_samples=240", "data.size=32",
           "data.batch_size=2", "data.num_workers=0", "trainer.max_steps=1", "trainer.accelerator=cpu",
           "trainer.devices=1", "trainer.precision=32-true", "trainer.strategy=auto", "trainer.log_every_n_steps=1",
           "trainer.enable_progress_bar=false", "train.checkpoint.every_n_steps=1", "sample.every_n_steps=0"]


def overrides(cfg_path: str) -> list[str]:
    cfg = load_config(cfg_path)
    p = cfg.model.params
    extra = []
    if "ddconfig" in p:
        extra.append("model.params.ddconfig.resolution=32")
    if "vision_cfg" in p and p.vision_cfg is not None:
        extra.append("model.params.vision_cfg.image_size=32")
    generic = list(GENERIC)
    if cfg.train.get("stage") == "diffusion":
        f = 2 ** (len(p.first_stage_config.params.ddconfig.ch_mult) - 1)  # the autoencoder's downsampling
        d = 2 ** (len(p.unet_config.params.channel_mult) - 1)  # the U-Net's: SD's latents must be multiples of 8
        latent = max(32 // f, d)
        generic = [f"data.size={latent * f}" if o.startswith("data.size=") else o for o in generic]
        extra += [f"model.params.image_size={latent}", "train.init_checkpoint=null", "train.scale_batches=1"]
    if cfg.train.get("val_every_n_steps"):  # validation at the end of the step, on the fixture
        extra += ["data.val=tests/fixtures/emoji/emoji32-000000.tar", "data.val_num_samples=240",
                  "train.val_batches=1"]
    if cfg_path in FULL_SIZE:  # fp32 weights, gradients and AdamW moments of a 0.9 B U-Net fit in 23 GB, an EMA copy not
        extra.append("train.ema_decay=null")
    return generic + extra


def test_every_config_parses():
    assert TRAINING and len(CONFIGS) >= 10
    for c in CONFIGS:
        load_config(ROOT / c)


@pytest.mark.parametrize("cfg", [pytest.param(c, marks=pytest.mark.slow) if c in FULL_SIZE else c for c in TRAINING])
def test_config_trains_one_step(cfg, tmp_path):
    trainer = run(["--config", cfg, "--run-dir", str(tmp_path), *overrides(cfg)])
    assert trainer.global_step == 1
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "checkpoints" / "last.ckpt").is_file()
