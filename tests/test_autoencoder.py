"""KL autoencoder: equality with diffusers, SD checkpoint layout, latent scaling, posterior math, errors."""
from __future__ import annotations

import pytest
import torch

from ldm.attention import AttentionBackendError
from ldm.autoencoder import AutoencoderKL, DiagonalGaussianDistribution
from ldm.registry import ConfigError

import diffusers  # a dev dependency: missing means a broken install, not a skip
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402

TINY = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2],
            num_res_blocks=1, attn_resolutions=[], dropout=0.0)
SD_KL_F8 = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
                num_res_blocks=2, attn_resolutions=[], dropout=0.0)
DIFFUSERS_KL_F8_PARAMS = 83_653_863


def diffusers_config(dd: dict) -> dict:
    n = len(dd["ch_mult"])
    return dict(in_channels=dd["in_channels"], out_channels=dd["out_ch"], down_block_types=["DownEncoderBlock2D"] * n,
                up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=[dd["ch"] * m for m in dd["ch_mult"]],
                latent_channels=dd["z_channels"], layers_per_block=dd["num_res_blocks"], sample_size=dd["resolution"])


def to_diffusers(ours: AutoencoderKL, dd: dict) -> tuple[torch.nn.Module, int]:
    """Our state dict -> diffusers' converter (expects the ``first_stage_model.`` prefix) -> diffusers model."""
    sd = {f"first_stage_model.{k}": v for k, v in ours.state_dict().items()}
    cfg = diffusers_config(dd)
    converted = convert_ldm_vae_checkpoint(sd, cfg)
    ref = diffusers.AutoencoderKL(**cfg)
    ref.load_state_dict(converted, strict=True)  # raises on any missing/unexpected key or shape mismatch
    return ref, len(converted)


@pytest.fixture(scope="module")
def tiny() -> AutoencoderKL:
    torch.manual_seed(0)
    model = AutoencoderKL(TINY, embed_dim=4).eval()
    with torch.no_grad():  # non-trivial GroupNorm affine parameters, so a mapping mix-up cannot hide
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def test_matches_diffusers(tiny: AutoencoderKL) -> None:
    ref, n_converted = to_diffusers(tiny, TINY)
    assert n_converted == len(tiny.state_dict())
    ref.eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        ours, theirs = tiny.encode(x), ref.encode(x).latent_dist
        for a, b in ((ours.mean, theirs.mean), (ours.logvar, theirs.logvar)):
            assert (a - b).abs().max() <= 1e-4 * b.abs().max()
        z = ours.mode()
        a, b = tiny.decode(z), ref.decode(z).sample
        assert a.shape == (2, 3, 32, 32)
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()
        a, b = tiny(x, sample_posterior=False)[0], ref(x, sample_posterior=False).sample
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()


def test_attention_backends_agree() -> None:
    torch.manual_seed(0)
    model = AutoencoderKL(dict(TINY, attn_resolutions=[16]), embed_dim=4).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a = model(x, sample_posterior=False)[0]
        model.set_attention_backend("math")
        b = model(x, sample_posterior=False)[0]
    assert all(m.attn_backend == "math" for m in model.modules() if hasattr(m, "attn_backend"))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(AttentionBackendError, match="nope"):
        model.set_attention_backend("nope")


def test_full_size_kl_f8_layout() -> None:
    with torch.device("meta"):
        ours = AutoencoderKL(SD_KL_F8, embed_dim=4)
        ref, n_converted = to_diffusers(ours, SD_KL_F8)
    sd = ours.state_dict()
    assert n_converted == len(sd)  # every key of ours was mapped, none left over
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == sum(p.numel() for p in ref.parameters()) == DIFFUSERS_KL_F8_PARAMS
    shapes = {  # the original LDM names and shapes of the SD checkpoints' first_stage_model.*
        "encoder.conv_in.weight": (128, 3, 3, 3), "encoder.down.0.block.0.norm1.weight": (128,),
        "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1), "encoder.mid.attn_1.proj_out.bias": (512,),
        "encoder.conv_out.weight": (8, 512, 3, 3), "quant_conv.weight": (8, 8, 1, 1),
        "post_quant_conv.weight": (4, 4, 1, 1), "decoder.up.3.block.2.conv2.weight": (512, 512, 3, 3),
        "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3), "decoder.up.0.block.0.nin_shortcut.weight":
        (128, 256, 1, 1), "decoder.norm_out.weight": (128,), "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert "decoder.up.0.upsample.conv.weight" not in sd and "encoder.down.3.downsample.conv.weight" not in sd
    assert ours.downsample_factor == 8


def test_sd_inference_yaml_builds() -> None:
    from omegaconf import OmegaConf

    from ldm.registry import instantiate

    cfg = OmegaConf.load("configs/sd/v1-inference.yaml").model.params.first_stage_config
    with torch.device("meta"):
        vae = instantiate(cfg, "first_stage_config")
    assert isinstance(vae, AutoencoderKL) and vae.monitor == "val/rec_loss"
    assert sum(p.numel() for p in vae.parameters()) == DIFFUSERS_KL_F8_PARAMS


def test_attn_layout_options() -> None:
    keys = AutoencoderKL(dict(TINY, attn_resolutions=[16]), embed_dim=4).state_dict().keys()
    assert "encoder.down.1.attn.0.k.weight" in keys and "encoder.down.0.attn.0.k.weight" not in keys
    assert {"decoder.up.1.attn.0.v.weight", "decoder.up.1.attn.1.v.weight"} <= set(keys)
    keys = AutoencoderKL(dict(TINY, attn_type="none"), embed_dim=4).state_dict().keys()
    assert not any("attn" in k for k in keys)


def test_latent_scale_shift_round_trip(tiny: AutoencoderKL) -> None:
    model = AutoencoderKL(TINY, embed_dim=4, scale_factor=0.18215, shift_factor=0.1)
    model.load_state_dict(tiny.state_dict(), strict=True)  # scale/shift are not state: strict load still works
    assert not any("scale_factor" in k or "shift_factor" in k for k in model.state_dict())
    assert model.scale_factor.dtype == torch.float32 and model.scale_factor.ndim == 0
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z_mode = model.encode(x).mode()
        z = model.encode_latents(x)
        torch.testing.assert_close(z, (z_mode - 0.1) * 0.18215)
        torch.testing.assert_close(model.decode_latents(z), model.decode(z_mode), atol=1e-5, rtol=1e-5)
        g = torch.Generator().manual_seed(3)
        zs = model.encode_latents(x, sample=True, generator=g)
        assert not torch.allclose(zs, z)
    half = AutoencoderKL(TINY, embed_dim=4, scale_factor=0.18215).to(torch.bfloat16)
    assert half.scale_factor.dtype == torch.float32 and half.scale_factor.item() == pytest.approx(0.18215, rel=1e-7)
    with torch.no_grad():
        out = half.decode_latents(torch.randn(1, 4, 8, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (1, 3, 32, 32)


def test_posterior_math_against_torch_distributions() -> None:
    torch.manual_seed(0)
    params = torch.randn(2, 8, 4, 4)
    params[0, 4:, 0, 0] = torch.tensor([-100.0, 100.0, 0.0, 1.0])  # clamped log-variances
    post = DiagonalGaussianDistribution(params)
    assert post.logvar[0, :2, 0, 0].tolist() == [-30.0, 20.0]
    assert post.mean.shape == post.logvar.shape == (2, 4, 4, 4)
    q = torch.distributions.Normal(post.mean, post.std)
    prior = torch.distributions.Normal(torch.zeros_like(post.mean), torch.ones_like(post.mean))
    torch.testing.assert_close(post.kl(), torch.distributions.kl_divergence(q, prior).sum(dim=(1, 2, 3)))
    other = DiagonalGaussianDistribution(torch.randn(2, 8, 4, 4))
    q2 = torch.distributions.Normal(other.mean, other.std)
    torch.testing.assert_close(post.kl(other), torch.distributions.kl_divergence(q, q2).sum(dim=(1, 2, 3)))
    x = torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(post.nll(x), -q.log_prob(x).sum(dim=(1, 2, 3)))
    torch.testing.assert_close(post.var, post.std**2)
    a = post.sample(torch.Generator().manual_seed(7))
    b = post.sample(torch.Generator().manual_seed(7))
    eps = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, post.mean + post.std * eps)
    assert not torch.equal(a, post.sample(torch.Generator().manual_seed(8)))
    det = DiagonalGaussianDistribution(params, deterministic=True)
    assert torch.equal(det.sample(), det.mean) and torch.equal(det.kl(), torch.zeros(2))


def test_encoder_logvar_is_clamped(tiny: AutoencoderKL) -> None:
    model = AutoencoderKL(TINY, embed_dim=4)
    model.load_state_dict(tiny.state_dict())
    with torch.no_grad():
        model.quant_conv.bias[4:] = 1e4  # log-variance channels blow up
        post = model.encode(torch.zeros(1, 3, 32, 32))
    assert post.logvar.max().item() == 20.0 and torch.isfinite(post.var).all()


class _PointwiseDecoder(torch.nn.Module):
    """A decoder without spatial context: tiling must reproduce it exactly (tests offsets and blend weights)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(torch.tanh(z[:, :3] * 2 + z[:, 3:]), scale_factor=4.0)


def test_tiled_blend_is_exact_without_spatial_context() -> None:
    model = AutoencoderKL(TINY, embed_dim=4)
    model.decoder, model.post_quant_conv = _PointwiseDecoder(), torch.nn.Identity()
    z = torch.randn(2, 4, 29, 21)
    full = model.decode(z)
    for tile, overlap in ((8, 2), (16, 4), (10, 0), (12, None)):
        torch.testing.assert_close(model.decode(z, tile=tile, overlap=overlap), full, atol=1e-6, rtol=1e-6)


def test_tiled_decode_close_to_full(tiny: AutoencoderKL) -> None:
    z = torch.randn(1, 4, 40, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        small = z[..., :12, :12]
        assert torch.equal(tiny.decode(small, tile=12), tiny.decode(small))  # one tile = the plain decode
        full = tiny.decode(z)
        rel = {t: ((tiny.decode(z, tile=t) - full).abs().mean() / full.abs().mean()).item() for t in (16, 32)}
    # Documented seam tolerance (AutoencoderKL.decode): tiles see only their own GroupNorm statistics and attention
    # context. On this random-weight model the mean error is ~8% of the mean output at tile 32 (overlap 8) and
    # ~35% at tile 16: it shrinks as tiles grow.
    assert rel[32] < 0.15 and rel[32] < rel[16], rel
    with pytest.raises(ValueError, match="overlap"):
        tiny.decode(z, tile=16, overlap=16)


@pytest.mark.parametrize("bad, match", [
    (dict(TINY, colour=1), "colour"),
    ({k: v for k, v in TINY.items() if k != "ch"}, "'ch'"),
    (dict(TINY, attn_type="linear"), "attn_type"),
    (dict(TINY, use_linear_attn=True), "use_linear_attn"),
    (dict(TINY, double_z=False), "double_z"),
])
def test_bad_ddconfig(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AutoencoderKL(bad, embed_dim=4)


def test_ckpt_path_and_backend_rejected() -> None:
    with pytest.raises(ConfigError, match="ckpt_path"):
        AutoencoderKL(TINY, embed_dim=4, ckpt_path="model.ckpt")
    with pytest.raises(AttentionBackendError, match="bogus"):
        AutoencoderKL(TINY, embed_dim=4, attn_backend="bogus")
