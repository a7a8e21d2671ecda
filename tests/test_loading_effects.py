"""Options of checkpoint loading do what they say: EMA choice, dtype, strictness, the checkpoint's latent scale,
``train.init_use_ema``."""
from __future__ import annotations

import copy
import logging

import pytest
import torch

import ldm
from ldm.checkpoint import CheckpointError, read_state_dict, save_safetensors
from ldm.config import load_config
from ldm.ema import EMA
from ldm.registry import ConfigError

TINY = "configs/tiny/txt2img.yaml"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return ldm.load(config=TINY)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_ema_export_and_load_round_trip_bit_identical(tiny, tmp_path):
    """``ldm.save(ema_state=EMA.ldm_state())`` then ``ldm.load(use_ema=True)`` gives the EMA shadow exactly, and
    ``use_ema=False`` the raw weights exactly."""
    model = copy.deepcopy(tiny)
    ema = EMA(model.model, decay=0.5)
    raw = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    with torch.no_grad():
        for p in model.model.parameters():
            p.add_(1.0)
    ema.update(model.model)
    path = ldm.save(model, tmp_path / "m.safetensors", ema_state=ema.ldm_state())
    with_ema = dict(ldm.load(path, use_ema=True).model.named_parameters())
    assert all(torch.equal(with_ema[n], getattr(ema, s)) for n, s in ema.names.items())
    assert not torch.equal(with_ema["diffusion_model.out.2.weight"], raw["diffusion_model.out.2.weight"] + 1.0)
    plain = dict(ldm.load(path).model.named_parameters())
    assert all(torch.equal(plain[n], raw[n] + 1.0) for n in raw)


def test_use_ema_on_a_file_without_ema_names_the_count(tiny, tmp_path):
    path = ldm.save(tiny, tmp_path / "m.safetensors")
    n = sum(1 for _ in tiny.model.parameters())
    with pytest.raises(CheckpointError, match=rf"no EMA weights for {n} parameter"):
        ldm.load(path, use_ema=True)


def test_half_precision_file_loads_exactly_and_dtype_is_honoured(tiny, tmp_path):
    half = {k: v.half() for k, v in tiny.state_dict().items()}
    save_safetensors(half, tmp_path / "h.safetensors")
    fp32 = ldm.load(tmp_path / "h.safetensors", TINY)  # default: float32 model, values upcast exactly
    assert _equal(fp32.state_dict(), {k: v.float() for k, v in half.items()})
    fp16 = ldm.load(tmp_path / "h.safetensors", TINY, dtype=torch.float16)
    assert _equal(fp16.state_dict(), half)
    assert fp16.alphas_cumprod.dtype == torch.float64  # the schedule is never rounded
    back, _ = read_state_dict(ldm.save(fp16, tmp_path / "h2.safetensors"))  # fp16 model -> fp16 file, unchanged
    assert _equal(back, half)


def test_non_strict_load_reports_the_counts(tiny, tmp_path, caplog):
    sd = dict(tiny.state_dict())
    sd.pop("model.diffusion_model.out.2.weight")
    sd.pop("model.diffusion_model.out.2.bias")
    sd["model.diffusion_model.extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.ckpt")
    with caplog.at_level(logging.WARNING, logger="ldm.loading"):
        ldm.load(tmp_path / "bad.ckpt", TINY, strict=False)
    assert "2 missing key(s)" in caplog.text and "1 unexpected key(s)" in caplog.text


def test_scale_factor_saved_in_the_checkpoint_is_used(tiny, tmp_path):
    """Original LDM runs with ``scale_by_std: true`` save the measured latent scale as a ``scale_factor`` buffer;
    the config's value (a placeholder there) must not win, and the key must not fail a strict load."""
    sd = dict(tiny.state_dict())
    sd["scale_factor"] = torch.tensor(0.25)
    torch.save({"state_dict": sd}, tmp_path / "scaled.ckpt")
    cfg = load_config(TINY)
    cfg.model.params.scale_by_std = True
    model = ldm.load(tmp_path / "scaled.ckpt", cfg)
    assert float(model.first_stage_model.scale_factor) == 0.25
    assert model.config.model.params.scale_factor == 0.25  # and a saved copy keeps it
    again = ldm.load(ldm.save(model, tmp_path / "again.safetensors"))
    assert float(again.first_stage_model.scale_factor) == 0.25


def test_init_use_ema_without_an_init_checkpoint_is_refused():
    from ldm.diffusion.lightning import LatentDiffusionModule

    cfg = load_config(TINY)
    cfg.train.init_use_ema = True
    with pytest.raises(ConfigError, match="init_use_ema.*init_checkpoint"):
        LatentDiffusionModule(cfg)


def test_init_use_ema_starts_from_the_ema_weights(tiny, tmp_path):
    model = copy.deepcopy(tiny)
    ema = EMA(model.model, decay=0.0)  # β = 0: the shadow becomes the current weights, then moved away from them
    ema.update(model.model)
    with torch.no_grad():
        for p in model.model.parameters():
            p.add_(1.0)
    path = ldm.save(model, tmp_path / "m.safetensors", ema_state=ema.ldm_state())
    from ldm.diffusion.lightning import LatentDiffusionModule

    cfg = load_config(TINY)
    cfg.train.init_checkpoint, cfg.train.init_use_ema = str(path), True
    module = LatentDiffusionModule(cfg)
    got = dict(module.net.model.named_parameters())
    assert all(torch.equal(got[n], getattr(ema, s)) for n, s in ema.names.items())


def test_a_fine_tune_trains_the_loaded_unet_in_train_mode(tiny, tmp_path):
    """``load`` returns a model in eval mode (for sampling) and Lightning keeps submodules' modes: a fine-tune from
    ``train.init_checkpoint`` trained its U-Net in eval mode, without dropout or gradient checkpointing, which run
    only in train mode (``run_maybe_checkpointed``)."""
    from ldm.diffusion.lightning import LatentDiffusionModule

    path = ldm.save(tiny, tmp_path / "m.safetensors")
    cfg = load_config(TINY)
    cfg.train.init_checkpoint, cfg.train.gradient_checkpointing = str(path), True
    net = LatentDiffusionModule(cfg).net
    assert all(m.training for m in net.model.modules())
    assert not net.first_stage_model.training and not net.cond_stage_model.training
    assert [m.training for m in net.model.modules()] == [m.training for m in LatentDiffusionModule(
        load_config(TINY)).net.model.modules()]  # as a U-Net trained from scratch
