"""Stage 1 training: a real Lightning run of the KL autoencoder on the fixture shards, export, what trains when,
exact resume."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from ldm.checkpoint import META_CONFIG, read_state_dict
from ldm.cli.train import run
from ldm.config import load_config
from ldm.training.logs import logged

TINY = "configs/tiny/autoencoder.yaml"
ROOT = Path(__file__).resolve().parents[1]



def ckpt_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_train_export_and_reload(tmp_path):
    trainer = run(["--config", TINY, "--run-dir", str(tmp_path), "trainer.max_steps=3"])
    # global_step counts batches: the discriminator's step (on from step 2) is not counted as a second step
    assert trainer.global_step == 3 and trainer.lightning_module.batches_seen == 3
    ck = tmp_path / "checkpoints"
    assert (ck / "last.ckpt").is_file() and (ck / "step00000002.ckpt").is_file()
    assert (tmp_path / "samples" / "rec_00000002.png").is_file()
    assert set(logged(tmp_path, "train/disc_loss")) == {2}  # the discriminator trains from disc_start = 2
    assert len(logged(tmp_path, "train/rec_loss")) == 3

    sd, meta = read_state_dict(tmp_path / "model.safetensors")
    assert not any(k.startswith(("loss.", "autoencoder.")) for k in sd)  # the bare AE, original key names
    assert 0.1 < float(meta["latent_std"]) < 10.0 and META_CONFIG in meta

    from ldm.autoencoder.lightning import AutoencoderModule
    from ldm.loading import load_component

    fresh = AutoencoderModule(load_config(TINY)).autoencoder
    fresh.load_state_dict(sd, strict=True)
    ae = load_component(tmp_path / "model.safetensors")  # rebuilt from the embedded config
    trained = trainer.lightning_module.autoencoder
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref = trained.encode(x).mean
        assert torch.equal(ae.encode(x).mean, ref) and torch.equal(fresh.encode(x).mean, ref)


def test_export_is_the_first_stage_of_the_tiny_txt2img_model(tmp_path):
    """The U-Net stage loads the export with ``train.components.first_stage_model``."""
    run(["--config", TINY, "--run-dir", str(tmp_path), "trainer.max_steps=1", "train.latent_std_batches=0"])
    from ldm.diffusion.lightning import load_components
    from ldm.loading import build

    net = build(load_config("configs/tiny/txt2img.yaml"))
    load_components(net, {"first_stage_model": str(tmp_path / "model.safetensors")})
    sd, meta = read_state_dict(tmp_path / "model.safetensors")
    assert "latent_std" not in meta
    assert all(torch.equal(net.first_stage_model.state_dict()[k], v) for k, v in sd.items())


def test_logvar_trains_and_discriminator_is_frozen_before_disc_start(tmp_path):
    run(["--config", TINY, "--run-dir", str(tmp_path), "trainer.max_steps=3", "train.checkpoint.every_n_steps=1",
         "train.checkpoint.keep_last=5", "train.latent_std_batches=0"])
    s1, s2, s3 = (ckpt_weights(tmp_path / "checkpoints" / f"step0000000{i}.ckpt") for i in (1, 2, 3))
    disc = [k for k in s1 if k.startswith("loss.discriminator.")]
    assert disc and any(k.endswith("running_mean") for k in disc)
    # steps 0 and 1 (before disc_start = 2): the discriminator is neither run nor updated
    assert all(torch.equal(s1[k], s2[k]) for k in disc)
    # step 2: it is (weights and BatchNorm statistics)
    assert any(not torch.equal(s2[k], s3[k]) for k in disc if k.endswith("weight"))
    assert any(not torch.equal(s2[k], s3[k]) for k in disc if k.endswith("running_mean"))
    # the loss's log-variance is trained from the first step (the original optimizer never included it)
    assert float(s1["loss.logvar"]) != 0.0 and float(s1["loss.logvar"]) != float(s2["loss.logvar"])
    assert any(not torch.equal(s1[k], s2[k]) for k in s1 if k.startswith("autoencoder."))


def test_resume_is_bit_identical(tmp_path):
    a, b = tmp_path / "straight", tmp_path / "resumed"
    common = ["--config", TINY, "--resume", "auto", "train.checkpoint.every_n_steps=2", "train.latent_std_batches=0"]
    run([*common, "--run-dir", str(a), "trainer.max_steps=4"])
    run([*common, "--run-dir", str(b), "trainer.max_steps=2"])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        run([*common, "--run-dir", str(b), "trainer.max_steps=4"])
    noise = ("exists and is not empty", "will be deleted")  # the run's own checkpoints and log, not a mistake
    assert not [w for w in seen if any(n in str(w.message) for n in noise)]
    wa, wb = ckpt_weights(a / "checkpoints" / "last.ckpt"), ckpt_weights(b / "checkpoints" / "last.ckpt")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # AE, logvar, discriminator
    ea, eb = read_state_dict(a / "model.safetensors")[0], read_state_dict(b / "model.safetensors")[0]
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    for key in ("train/loss", "train/disc_loss", "train/logvar"):
        la, lb = logged(a, key), logged(b, key)
        assert la and lb == la, key  # metrics.csv keeps the first part's rows (Lightning's writer deleted them)


@pytest.mark.slow
def test_two_rank_ddp_run(tmp_path):
    """Both optimizers under DDP (gloo): some parameters get no gradient in one of the two backward passes."""
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", TINY, "--run-dir", str(tmp_path),
           "trainer.devices=2", "trainer.strategy=ddp_find_unused_parameters_true", "trainer.max_steps=3"]
    r = subprocess.run(cmd, check=False, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    sd = ckpt_weights(tmp_path / "checkpoints" / "last.ckpt")
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())


def test_the_original_yamls_lossconfig_is_the_loss_when_train_loss_is_absent(tmp_path):
    """An original autoencoder YAML keeps its loss in model.params.lossconfig (the original target path): it is read,
    not ignored; with train.loss too, one would be ignored, so both are refused; the inference configs'
    torch.nn.Identity stands for none."""
    from omegaconf import OmegaConf

    from ldm.autoencoder.lightning import AutoencoderModule
    from ldm.registry import ConfigError

    cfg = load_config(TINY)
    loss = {"target": "ldm.modules.losses.LPIPSWithDiscriminator",
            "params": {"disc_start": 7, "kl_weight": 3.0e-6, "disc_weight": 0.25, "perceptual_weight": 0.0}}
    cfg.model.params.lossconfig = loss
    with pytest.raises(ConfigError, match="train.loss and model.params.lossconfig .* are both set"):
        AutoencoderModule(cfg)
    del cfg.train.loss
    module = AutoencoderModule(cfg)
    assert module.loss.disc_start == 7 and module.loss.kl_weight == 3.0e-6 and module.loss.disc_factor == 1.0
    cfg.model.params.lossconfig = {"target": "torch.nn.Identity"}
    assert AutoencoderModule(cfg).loss.disc_start == AutoencoderModule(OmegaConf.merge(
        cfg, {"model": {"params": {"lossconfig": None}}})).loss.disc_start  # the default loss, as with none
