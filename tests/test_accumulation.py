"""Gradient accumulation (``trainer.accumulate_grad_batches``), which every stage applies itself (they optimize
manually, and Lightning refuses its own accumulation then): equal to one larger batch, exact resume, a non-finite
loss anywhere in a window skips its step, bad values named."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from ldm.checkpoint import read_state_dict
from ldm.cli.train import run
from ldm.registry import ConfigError

TINY = "configs/tiny/txt2img.yaml"
COMMON = ["--config", TINY, "train.caption_dropout=0", "train.ema_decay=null", "data.shuffle_buffer=1",
          "trainer.log_every_n_steps=1", "train.warmup_steps=0"]


@pytest.fixture
def deterministic_loss(monkeypatch):
    """The diffusion loss without its random draws (noise, timesteps, posterior samples), so that a batch of 8 and
    two accumulated batches of 4 have the same gradient up to rounding."""
    import ldm.diffusion.losses as losses
    from ldm.diffusion.lightning import LatentDiffusionModule

    def loss(model, z, cond, *args, **kwargs):  # (B,)
        t = torch.full((z.shape[0],), 500, dtype=torch.long)
        return (model(z, t, **cond).float() - z).pow(2).mean(dim=(1, 2, 3))  # z as the target: a real gradient

    def latents(self, batch, gen):  # the posterior mean instead of a sample
        with torch.no_grad():
            return self.net.first_stage_model.encode_latents(batch["image"], sample=False).float()

    monkeypatch.setattr(losses, "diffusion_loss", loss)
    monkeypatch.setattr(LatentDiffusionModule, "_latents", latents)


def unet(path) -> dict[str, torch.Tensor]:
    sd = read_state_dict(path)[0]
    return {k: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}


def test_two_batches_of_four_equal_one_batch_of_eight(tmp_path, deterministic_loss, monkeypatch):
    """One step: the same gradient norm and weights as a batch of 8 to float rounding (2e-11 measured), unlike a
    step on 4. (Over more steps AdamW amplifies that rounding in parameters whose gradients are near its ε: 1e-5
    after 3 steps.) The norm is what shows the 1/k scaling: Adam's first step hardly depends on the scale."""
    import ldm.training.guard as guard

    norms: list[float] = []
    real = guard.grad_norm
    monkeypatch.setattr(guard, "grad_norm", lambda grads: norms.append(float(real(grads))) or real(grads))
    big = run(COMMON + ["--run-dir", str(tmp_path / "b8"), "data.batch_size=8", "trainer.max_steps=1"])
    acc = run(COMMON + ["--run-dir", str(tmp_path / "b4x2"), "data.batch_size=4", "trainer.max_steps=1",
                        "trainer.accumulate_grad_batches=2"])
    one = run(COMMON + ["--run-dir", str(tmp_path / "b4"), "data.batch_size=4", "trainer.max_steps=1"])
    assert len(norms) == 3  # once per step, on the window's last batch
    assert norms[1] == pytest.approx(norms[0], rel=1e-5) and norms[2] != pytest.approx(norms[0], rel=1e-3)
    assert big.global_step == acc.global_step == one.global_step == 1  # optimizer steps, not batches
    assert acc.lightning_module.batches_seen == 2 and big.lightning_module.batches_seen == 1
    a, b, c = (unet(tmp_path / d / "model.safetensors") for d in ("b8", "b4x2", "b4"))
    gap = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    other = max((a[k].float() - c[k].float()).abs().max().item() for k in a)
    assert gap < 1e-9 and other > 1e-6


def test_resume_with_accumulation_is_exact(tmp_path):
    common = ["--config", TINY, "data.batch_size=2", "trainer.accumulate_grad_batches=3",
              "train.checkpoint.every_n_steps=2", "trainer.log_every_n_steps=1"]
    whole = run(common + ["--run-dir", str(tmp_path / "whole"), "trainer.max_steps=4"])
    assert whole.global_step == 4 and whole.lightning_module.batches_seen == 12
    assert whole.lr_scheduler_configs[0].scheduler.last_epoch == 4  # the schedule advances per step
    run(common + ["--run-dir", str(tmp_path / "part"), "trainer.max_steps=2"])
    resumed = run(common + ["--run-dir", str(tmp_path / "part"), "trainer.max_steps=4", "--resume", "auto"])
    assert resumed.lightning_module.batches_seen == 12
    a = read_state_dict(tmp_path / "whole" / "model.safetensors")[0]
    b = read_state_dict(tmp_path / "part" / "model.safetensors")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_stopped_inside_a_window_resumes_with_the_whole_window(tmp_path):
    """``trainer.max_time`` (or any ``should_stop``) can end a run after a window's first batches; the checkpoint
    written at the end of training held that mid-window data position, so the resumed run trained the window's last
    batches alone as a smaller step, and its weights left the uninterrupted run's. It saves the window's start."""
    class StopAt(L.Callback):
        def on_train_batch_end(self, trainer, module, *args):
            if module.batches_seen == 7:  # the first batch of the third window of 3
                trainer.should_stop = True

    common = ["--config", TINY, "data.batch_size=2", "trainer.accumulate_grad_batches=3",
              "train.checkpoint.every_n_steps=100", "trainer.log_every_n_steps=1"]
    run(common + ["--run-dir", str(tmp_path / "whole"), "trainer.max_steps=4"])
    part = tmp_path / "part"
    stopped = run(common + ["--run-dir", str(part), "trainer.max_steps=4"], callbacks=[StopAt()])
    assert stopped.global_step == 2 and stopped.lightning_module.batches_seen == 7
    saved = torch.load(part / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 2 and saved["batches_seen"] == 6
    resumed = run(common + ["--run-dir", str(part), "trainer.max_steps=4", "--resume", "auto"])
    assert resumed.lightning_module.batches_seen == 12
    a = read_state_dict(tmp_path / "whole" / "model.safetensors")[0]
    b = read_state_dict(part / "model.safetensors")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_non_finite_loss_in_a_window_skips_its_step(tmp_path, monkeypatch, recwarn):
    import ldm.diffusion.losses as losses
    from ldm.diffusion.lightning import LatentDiffusionModule

    real = losses.diffusion_loss
    seen = {"n": 0}

    def poisoned(*args, **kwargs):
        seen["n"] += 1
        out = real(*args, **kwargs)
        return out * float("nan") if seen["n"] == 1 else out  # the first batch of the first window

    monkeypatch.setattr(losses, "diffusion_loss", poisoned)
    before = {}
    orig_setup = LatentDiffusionModule.on_fit_start

    def remember(self):
        orig_setup(self)
        before.update({k: v.detach().clone() for k, v in self.net.model.state_dict().items()})

    monkeypatch.setattr(LatentDiffusionModule, "on_fit_start", remember)
    tr = run(["--config", TINY, "--run-dir", str(tmp_path), "data.batch_size=2", "trainer.max_steps=2",
              "trainer.accumulate_grad_batches=2"])
    module = tr.lightning_module
    assert module.guard.skipped == 1  # the whole first window (batches 1 and 2), counted once
    # the skipped window counts as a step (global_step stays the window index), the second window stepped
    assert module.batches_seen == 4 and tr.global_step == 2
    after = module.net.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # the skipped first step advanced the schedule by design: torch's "lr_scheduler.step() before optimizer.step()"
    assert not [w for w in recwarn if "before `optimizer.step()`" in str(w.message)]


@pytest.mark.parametrize("value", ["0", "-2", "1.5", "true"])
def test_bad_accumulation_is_named(tmp_path, value):
    with pytest.raises(ConfigError, match="accumulate_grad_batches must be a positive int"):
        run(["--config", TINY, "--run-dir", str(tmp_path), "trainer.max_steps=1",
             f"trainer.accumulate_grad_batches={value}"])


def test_the_autoencoder_refuses_accumulation(tmp_path):
    with pytest.raises(ConfigError, match="autoencoder: trainer.accumulate_grad_batches is not supported"):
        run(["--config", "configs/tiny/autoencoder.yaml", "--run-dir", str(tmp_path), "trainer.max_steps=1",
             "trainer.accumulate_grad_batches=2"])
