"""ldm ⇄ diffusers conversion, checked against diffusers' own single-file converter and diffusers' models."""
from __future__ import annotations

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL as DAutoencoderKL  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint,  # noqa: E402
                                                 convert_ldm_vae_checkpoint)

from ldm.autoencoder.model import AutoencoderKL  # noqa: E402
from ldm.convert.diffusers_unet import (unet_config_from_diffusers, unet_config_to_diffusers,  # noqa: E402
                                        unet_diffusers_to_ldm, unet_ldm_to_diffusers)
from ldm.convert.diffusers_vae import (vae_config_from_diffusers, vae_config_to_diffusers,  # noqa: E402
                                       vae_diffusers_to_ldm, vae_ldm_to_diffusers)
from ldm.unet.model import UNetModel  # noqa: E402

UNET_V1 = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2, 1],
               num_res_blocks=2, channel_mult=[1, 2, 2, 2], num_heads=2, use_spatial_transformer=True,
               transformer_depth=1, context_dim=32, legacy=False)
UNET_V2 = dict({k: v for k, v in UNET_V1.items() if k != "num_heads"}, num_head_channels=16,
               use_linear_in_transformer=True, context_dim=64)
UNET_ADM = dict(UNET_V2, num_res_blocks=1, attention_resolutions=[2], num_classes="sequential", adm_in_channels=24)
SD_V1_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                  num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                  transformer_depth=1, context_dim=768, use_checkpoint=True, legacy=False)
SD_V2_UNET = dict({k: v for k, v in SD_V1_UNET.items() if k != "num_heads"}, num_head_channels=64,
                  use_linear_in_transformer=True, context_dim=1024)
DDCONFIG = dict(double_z=True, z_channels=4, resolution=64, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2],
                num_res_blocks=1, attn_resolutions=[], dropout=0.0)
SD_DDCONFIG = dict(DDCONFIG, resolution=256, ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2)


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere (zero-initialized output convs would hide mapping errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module.eval()


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b), f"only in first: {sorted(set(a) - set(b))[:5]}, only in second: {sorted(set(b) - set(a))[:5]}"
    bad = [k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:5]}"


@pytest.mark.parametrize("params", [UNET_V1, UNET_V2, UNET_ADM], ids=["v1", "v2", "adm"])
def test_unet_matches_diffusers(params: dict) -> None:
    ours = _randomize(UNetModel(**params), 0)
    sd = ours.state_dict()
    cfg = unet_config_to_diffusers(params)
    converted = unet_ldm_to_diffusers(sd, params)
    reference = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in sd.items()}, cfg)
    _assert_same(converted, reference)
    _assert_same(unet_diffusers_to_ldm(converted, params), sd)  # exact round trip

    theirs = UNet2DConditionModel.from_config(cfg).eval()
    theirs.load_state_dict(converted, strict=True)
    torch.manual_seed(1)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10.0, 700.0])
    ctx = torch.randn(2, 5, params["context_dim"])
    y = torch.randn(2, params["adm_in_channels"]) if "adm_in_channels" in params else None
    with torch.no_grad():
        a = ours(x, t, context=ctx, y=y)
        b = theirs(x, t, encoder_hidden_states=ctx, class_labels=y).sample
    assert (a - b).abs().max().item() < 1e-4


def test_unet_config_round_trip() -> None:
    for params in (SD_V1_UNET, SD_V2_UNET, UNET_ADM):
        cfg = unet_config_to_diffusers(params)
        back = unet_config_from_diffusers(cfg)
        assert unet_config_to_diffusers(back) == cfg
    assert unet_config_to_diffusers(SD_V1_UNET)["attention_head_dim"] == 8
    assert unet_config_to_diffusers(SD_V2_UNET)["attention_head_dim"] == [5, 10, 20, 20]


@pytest.mark.parametrize("params", [SD_V1_UNET, SD_V2_UNET], ids=["sd-v1", "sd-v2"])
def test_full_size_unet_keys(params: dict) -> None:
    """Full-size SD U-Net key sets (meta tensors: shapes only) convert with nothing left over."""
    with torch.device("meta"):
        ours = UNetModel(**params)
        theirs = UNet2DConditionModel(**{k: v for k, v in unet_config_to_diffusers(params).items()
                                         if not k.startswith("_")})
    sd = ours.state_dict()
    converted = unet_ldm_to_diffusers(sd, params)
    expected = theirs.state_dict()
    assert set(converted) == set(expected)
    assert all(converted[k].shape == expected[k].shape for k in expected)
    assert set(unet_diffusers_to_ldm(expected, params)) == set(sd)


def test_unet_wrong_config_names_keys() -> None:
    sd = UNetModel(**UNET_V1).state_dict()
    with pytest.raises(KeyError, match="fit no module"):
        unet_ldm_to_diffusers(sd, dict(UNET_V1, num_res_blocks=1))
    with pytest.raises(NotImplementedError, match="resblock_updown"):
        unet_config_to_diffusers(dict(UNET_V1, resblock_updown=True))
    with pytest.raises(NotImplementedError, match="act_fn"):
        unet_config_from_diffusers(dict(unet_config_to_diffusers(UNET_V1), act_fn="gelu"))


def test_vae_matches_diffusers() -> None:
    ours = _randomize(AutoencoderKL(ddconfig=DDCONFIG, embed_dim=4), 2)
    sd = ours.state_dict()
    cfg = vae_config_to_diffusers(DDCONFIG, 4, scaling_factor=0.5)
    converted = vae_ldm_to_diffusers(sd, DDCONFIG)
    reference = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in sd.items()}, cfg)
    _assert_same(converted, reference)
    assert converted["encoder.mid_block.attentions.0.to_q.weight"].shape == (64, 64)
    _assert_same(vae_diffusers_to_ldm(converted, DDCONFIG), sd)
    # pre-0.14 diffusers attention names are read too
    old = {k.replace(".to_q.", ".query.").replace(".to_out.0.", ".proj_attn."): v for k, v in converted.items()}
    _assert_same(vae_diffusers_to_ldm(old, DDCONFIG), sd)

    theirs = DAutoencoderKL.from_config(cfg).eval()
    theirs.load_state_dict(converted, strict=True)
    torch.manual_seed(3)
    x, z = torch.randn(1, 3, 32, 32), torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        post_a, post_b = ours.encode(x), theirs.encode(x).latent_dist
        assert (post_a.mean - post_b.mean).abs().max().item() < 1e-4
        assert (post_a.logvar - post_b.logvar).abs().max().item() < 1e-4
        assert (ours.decode(z) - theirs.decode(z).sample).abs().max().item() < 1e-4
    back = vae_config_from_diffusers(cfg)
    assert back["ddconfig"] == DDCONFIG and back["embed_dim"] == 4 and back["scale_factor"] == 0.5


def test_full_size_vae_keys() -> None:
    with torch.device("meta"):
        ours = AutoencoderKL(ddconfig=SD_DDCONFIG, embed_dim=4)
        cfg = vae_config_to_diffusers(SD_DDCONFIG, 4, scaling_factor=0.18215)
        theirs = DAutoencoderKL(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    converted = vae_ldm_to_diffusers(ours.state_dict(), SD_DDCONFIG)
    expected = theirs.state_dict()
    assert set(converted) == set(expected)
    assert all(converted[k].shape == expected[k].shape for k in expected)


def test_vae_unsupported_config() -> None:
    with pytest.raises(NotImplementedError, match="attn_resolutions"):
        vae_config_to_diffusers(dict(DDCONFIG, attn_resolutions=[16]), 4, 0.18215)
    with pytest.raises(NotImplementedError, match="embed_dim"):
        vae_config_to_diffusers(DDCONFIG, 3, 0.18215)
