"""ldm.load's additions on top of a checkpoint: a separate autoencoder file, CLIP skip, options on diffusers folders."""
from __future__ import annotations

import pytest
import torch

import ldm
from ldm.checkpoint import CheckpointError, save_safetensors
from ldm.convert import export_diffusers
from ldm.convert.diffusers_vae import vae_ldm_to_diffusers

TINY = "configs/tiny/txt2img.yaml"


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Two tiny models with different weights, the first saved as a checkpoint."""
    d = tmp_path_factory.mktemp("addons")
    torch.manual_seed(0)
    a = ldm.load(config=TINY)
    torch.manual_seed(1)
    b = ldm.load(config=TINY)
    return a, b, ldm.save(a, d / "a.safetensors"), d


def _vae_files(b, d) -> dict:
    vae = b.first_stage_model.state_dict()
    ddconfig = b.config.model.params.first_stage_config.params.ddconfig
    files = {"ldm": d / "vae.ckpt", "whole": d / "whole.safetensors", "diffusers": d / "vae-diffusers.safetensors"}
    # a released autoencoder .ckpt: {"state_dict": ...} with its training loss beside the weights
    torch.save({"state_dict": {**vae, "loss.logvar": torch.zeros(())}}, files["ldm"])
    save_safetensors(b.state_dict(), files["whole"])
    save_safetensors(vae_ldm_to_diffusers(vae, ddconfig), files["diffusers"])
    return files


@pytest.mark.parametrize("kind", ["ldm", "whole", "diffusers"])
def test_separate_vae_replaces_only_the_autoencoder(two, kind) -> None:
    a, b, ckpt, d = two
    model = ldm.load(ckpt, vae=_vae_files(b, d)[kind])
    for k, v in model.first_stage_model.state_dict().items():
        assert torch.equal(v, b.first_stage_model.state_dict()[k]), k
    for k, v in model.model.state_dict().items():
        assert torch.equal(v, a.model.state_dict()[k]), k
    assert not torch.equal(model.first_stage_model.decoder.conv_out.weight, a.first_stage_model.decoder.conv_out.weight)


def test_a_vae_of_another_shape_is_named(two, tmp_path) -> None:
    _, _, ckpt, _ = two
    vae = ldm.load(config=TINY).first_stage_model.state_dict()
    bad = {k: (v[:1] if k == "decoder.conv_out.bias" else v) for k, v in vae.items() if k != "quant_conv.bias"}
    save_safetensors(bad, tmp_path / "odd.safetensors")
    with pytest.raises(CheckpointError, match=r"odd.safetensors does not fit the autoencoder: 1 missing .*quant_conv"
                                              r".*1 of another shape .*conv_out.bias"):
        ldm.load(ckpt, vae=tmp_path / "odd.safetensors")


def test_clip_skip_selects_the_layer_and_is_saved(two, tmp_path) -> None:
    a, _, ckpt, _ = two
    prompts = ["a red cat", "a blue dog"]
    assert a.cond_stage_model.layer == "last"
    last = a.encode_text(prompts)
    skip = ldm.load(ckpt, clip_skip=2)
    assert skip.cond_stage_model.layer == "penultimate"
    pen = skip.encode_text(prompts)
    assert not torch.allclose(pen, last)
    a.cond_stage_model.layer = "penultimate"
    try:
        torch.testing.assert_close(pen, a.encode_text(prompts))
    finally:
        a.cond_stage_model.layer = "last"
    again = ldm.load(ldm.save(skip, tmp_path / "skip.safetensors"))
    assert again.cond_stage_model.layer == "penultimate"
    torch.testing.assert_close(ldm.load(ckpt, clip_skip=1).encode_text(prompts), last)
    with pytest.raises(ValueError, match="clip_skip must be 1"):
        ldm.load(ckpt, clip_skip=3)


def test_options_apply_to_a_diffusers_folder_too(two, tmp_path) -> None:
    a, b, _, d = two
    export_diffusers(a, tmp_path / "sd")
    model = ldm.load(tmp_path / "sd", vae=_vae_files(b, d)["ldm"], clip_skip=2)
    assert model.cond_stage_model.layer == "penultimate"
    assert torch.equal(model.first_stage_model.decoder.conv_out.weight, b.first_stage_model.decoder.conv_out.weight)


def test_a_vae_file_with_linear_attention_weights_loads(two, tmp_path) -> None:
    """Autoencoder files converted back from diffusers may hold the attention's 1×1 convolutions as Linear weights."""
    a, b, ckpt, _ = two
    flat = {k: (v[:, :, 0, 0] if v.ndim == 4 and v.shape[2:] == (1, 1) else v)
            for k, v in b.first_stage_model.state_dict().items()}
    assert any(v.ndim == 2 for v in flat.values())
    save_safetensors(flat, tmp_path / "flat-vae.safetensors")
    model = ldm.load(ckpt, vae=tmp_path / "flat-vae.safetensors")
    ref = b.first_stage_model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.first_stage_model.state_dict().items())


def test_clip_skip_refuses_a_layer_a_diffusers_folder_does_not_hold(tmp_path) -> None:
    from test_convert_diffusers import _tiny_model

    v2 = _tiny_model("v2")  # conditions on the penultimate layer: the folder holds all layers but the last
    export_diffusers(v2, tmp_path / "sd")
    assert ldm.load(tmp_path / "sd", clip_skip=2).cond_stage_model.layer == "penultimate"
    with pytest.raises(ValueError, match="clip_skip=1: this text encoder's last layer is not in its weights"):
        ldm.load(tmp_path / "sd", clip_skip=1)
    with pytest.raises(ValueError, match="use_ema: .* is a diffusers folder"):
        ldm.load(tmp_path / "sd", use_ema=True)
