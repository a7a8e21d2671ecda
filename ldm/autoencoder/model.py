"""The KL-regularized autoencoder of latent diffusion (Rombach et al. 2022, §3 and App. G).

E(x) gives the posterior q(z|x) = N(μ, σ²) of a latent with f = 2^(len(ch_mult)-1) times fewer pixels per side;
D(z) maps a latent back to an image. Module and attribute names follow the original LDM code
(``ldm/models/autoencoder.py``, ``ldm/modules/diffusionmodules/model.py``) so that the ``first_stage_model.*`` part
of released Stable Diffusion checkpoints loads with ``strict=True``:
``encoder.down.{i}.block.{j}``, ``encoder.down.{i}.downsample.conv``, ``encoder.mid.{block_1,attn_1,block_2}``,
``decoder.up.{i}.block.{j}``, ``decoder.up.{i}.upsample.conv``, ``quant_conv``, ``post_quant_conv``.

The diffusion model sees scaled latents z' = scale·(z − shift) (:meth:`AutoencoderKL.encode_latents`); scale and
shift live with the model as non-persistent buffers (their values come from the config), never as inline constants.
Losses are in :mod:`ldm.autoencoder.losses`; training in ``ldm.autoencoder.lightning``.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ldm.attention import attention, check_backend
from ldm.autoencoder.distributions import DiagonalGaussianDistribution
from ldm.norm import GroupNorm
from ldm.resample import upsample_nearest
from ldm.registry import ConfigError

log = logging.getLogger(__name__)

_COMMON_KEYS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "resamp_with_conv", "resolution",
                "z_channels", "attn_type")
ENCODER_KEYS = _COMMON_KEYS + ("in_channels", "double_z")
DECODER_KEYS = _COMMON_KEYS + ("out_ch", "tanh_out", "give_pre_end")
DDCONFIG_REQUIRED = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "in_channels", "out_ch", "resolution",
                     "z_channels")
ATTN_TYPES = ("vanilla", "vanilla-xformers", "none")  # "vanilla-xformers" (SD 2 YAMLs) has the same weights


# The autoencoder's compiled GroupNorms compute their statistics with Welford's method (ldm.norm's "welford", one
# var_mean per group, which inductor splits itself in this graph: a group holds up to 1 M values at 512 px). Measured
# 512 px decodes against diffusers' in the same process (H200, docs/BENCHMARKS.md): "welford" 6.49 against 7.53 ms and
# 6.76 against 7.65 (12-03, two machines); "shifted" 8.19 against 8.53 (12-04, a slower machine); the U-Net's
# default, four parts per group, 7.69 against 7.57 (12-04).
NORM_STATS = "welford"


def Normalize(channels: int) -> GroupNorm:  # noqa: N802 (original name)
    """GroupNorm(32 groups, eps 1e-6), as in the original."""
    return GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True, stats=NORM_STATS)


class ResnetBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))), with a 1×1 ``nin_shortcut`` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))  # (B, C_out, H, W)
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H·W positions, q/k/v/proj_out as 1×1 convs (original layout)."""

    def __init__(self, channels: int, attn_backend: str = "sdpa") -> None:
        super().__init__()
        self.norm = Normalize(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))
        self.attn_backend = attn_backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(B, 1, C, H * W).transpose(-1, -2).contiguous()  # (B, 1, HW, C)

        h = attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)), backend=self.attn_backend)
        h = h.transpose(-1, -2).reshape(B, C, H, W)  # (B, C, H, W)
        return x + self.proj_out(h)


def make_attn(channels: int, attn_type: str, attn_backend: str) -> nn.Module:
    """``AttnBlock`` for "vanilla" (and "vanilla-xformers"), ``nn.Identity`` for "none"."""
    return nn.Identity() if attn_type == "none" else AttnBlock(channels, attn_backend)


class Downsample(nn.Module):
    """Halve H and W: asymmetric zero pad (right/bottom) + 3×3 stride-2 conv, or 2×2 average pooling."""

    def __init__(self, channels: int, with_conv: bool = True) -> None:
        super().__init__()
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "conv"):
            return F.avg_pool2d(x, kernel_size=2, stride=2)  # (B, C, H/2, W/2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour interpolation, then an optional 3×3 conv."""

    def __init__(self, channels: int, with_conv: bool = True) -> None:
        super().__init__()
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = upsample_nearest(x)  # (B, C, 2H, 2W)
        return self.conv(x) if hasattr(self, "conv") else x


class Level(nn.Module):
    """One resolution of the encoder or decoder: ``block`` (ResnetBlocks), ``attn`` (one per block, or none)."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int, use_attn: bool, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        self.block, self.attn = nn.ModuleList(), nn.ModuleList()
        for _ in range(n_blocks):
            self.block.append(ResnetBlock(c_in, c_out, cfg["dropout"]))
            c_in = c_out
            if use_attn:
                self.attn.append(make_attn(c_out, cfg["attn_type"], cfg["attn_backend"]))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[j](h)
        return h


def _mid(channels: int, cfg: Mapping[str, Any]) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, cfg["dropout"])
    mid.attn_1 = make_attn(channels, cfg["attn_type"], cfg["attn_backend"])
    mid.block_2 = ResnetBlock(channels, channels, cfg["dropout"])
    return mid


def _run_mid(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    """x (B, in_channels, H, W) -> moments (B, 2·z_channels, H/f, W/f) (or z_channels when not ``double_z``)."""

    def __init__(self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, attn_resolutions: tuple[int, ...],
                 in_channels: int, resolution: int, z_channels: int, double_z: bool = True, dropout: float = 0.0,
                 resamp_with_conv: bool = True, attn_type: str = "vanilla", attn_backend: str = "sdpa") -> None:
        super().__init__()
        cfg = dict(dropout=dropout, attn_type=attn_type, attn_backend=attn_backend)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        widths, res = [ch * m for m in ch_mult], resolution
        c_in = ch
        self.down = nn.ModuleList()
        for i, c_out in enumerate(widths):
            level = Level(c_in, c_out, num_res_blocks, res in attn_resolutions, cfg)
            if i != len(widths) - 1:
                level.downsample = Downsample(c_out, resamp_with_conv)
                res //= 2
            self.down.append(level)
            c_in = c_out
        self.mid = _mid(c_in, cfg)
        self.norm_out = Normalize(c_in)
        self.conv_out = nn.Conv2d(c_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            h = level(h)  # (B, ch·m_i, H/2^i, W/2^i)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = _run_mid(self.mid, h)  # (B, ch·m_last, H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2z, H/f, W/f)


class Decoder(nn.Module):
    """z (B, z_channels, h, w) -> x (B, out_ch, h·f, w·f); each level has ``num_res_blocks + 1`` ResnetBlocks."""

    def __init__(self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, attn_resolutions: tuple[int, ...],
                 out_ch: int, resolution: int, z_channels: int, dropout: float = 0.0, resamp_with_conv: bool = True,
                 attn_type: str = "vanilla", tanh_out: bool = False, give_pre_end: bool = False,
                 attn_backend: str = "sdpa") -> None:
        super().__init__()
        cfg = dict(dropout=dropout, attn_type=attn_type, attn_backend=attn_backend)
        self.tanh_out, self.give_pre_end = tanh_out, give_pre_end
        c_in = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, c_in, 3, padding=1)
        self.mid = _mid(c_in, cfg)
        levels: list[Level] = []
        for i in reversed(range(len(ch_mult))):  # built deepest first, stored shallowest first (up.0 = full res)
            c_out = ch * ch_mult[i]
            level = Level(c_in, c_out, num_res_blocks + 1, res in attn_resolutions, cfg)
            if i != 0:
                level.upsample = Upsample(c_out, resamp_with_conv)
                res *= 2
            levels.insert(0, level)
            c_in = c_out
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(c_in)
        self.conv_out = nn.Conv2d(c_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run_mid(self.mid, self.conv_in(z))  # (B, ch·m_last, h, w)
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)  # (B, ch·m_i, 2h', 2w')
        if self.give_pre_end:
            return h
        h = self.conv_out(F.silu(self.norm_out(h)))  # (B, out_ch, H, W)
        return torch.tanh(h) if self.tanh_out else h


def check_ddconfig(ddconfig: Mapping[str, Any]) -> dict[str, Any]:
    """Validate an original-style ``ddconfig`` and fill defaults; raise :class:`ConfigError` naming the bad key."""
    cfg = dict(ddconfig)
    allowed = set(ENCODER_KEYS) | set(DECODER_KEYS) | {"use_linear_attn"}
    for key in cfg:
        if key not in allowed:
            raise ConfigError(f"ddconfig: unknown key {key!r}; accepted: {', '.join(sorted(allowed))}")
    for key in DDCONFIG_REQUIRED:
        if key not in cfg:
            raise ConfigError(f"ddconfig: missing key {key!r}")
    if cfg.pop("use_linear_attn", False):
        raise ConfigError("ddconfig: use_linear_attn=True (linear attention) is not supported")
    cfg.setdefault("attn_type", "vanilla")
    if cfg["attn_type"] not in ATTN_TYPES:
        raise ConfigError(f"ddconfig: attn_type {cfg['attn_type']!r} not in {ATTN_TYPES}")
    if not cfg.get("double_z", True):
        raise ConfigError("ddconfig: double_z must be true for a KL autoencoder (the encoder outputs mean ‖ logvar)")
    cfg["ch_mult"] = tuple(int(m) for m in cfg["ch_mult"])
    cfg["attn_resolutions"] = tuple(int(r) for r in cfg["attn_resolutions"])
    return cfg


class AutoencoderKL(nn.Module):
    """The SD first stage: ``encoder`` → ``quant_conv`` → q(z|x); z → ``post_quant_conv`` → ``decoder``.

    Args:
        ddconfig: the original YAML's encoder/decoder params (see :func:`check_ddconfig`).
        embed_dim: latent channels after ``quant_conv`` (4 for SD).
        lossconfig: accepted for original YAMLs; the model ignores it, the autoencoder training stage reads it when
            ``train.loss`` is not set (:func:`ldm.autoencoder.lightning.loss_config`).
        scale_factor, shift_factor: latent statistics; the diffusion model sees scale·(z − shift).
        monitor, image_key, ignore_keys, colorize_nlabels: original training options, kept as attributes.
        ckpt_path: not supported here (raises); load weights with ``ldm.load`` / ``ldm.checkpoint``.
        attn_backend: attention kernel of the attention blocks (``ldm.attention.BACKENDS``).
    """

    def __init__(self, ddconfig: Mapping[str, Any], embed_dim: int, lossconfig: Mapping[str, Any] | None = None,
                 scale_factor: float = 1.0, shift_factor: float = 0.0, monitor: str | None = None,
                 image_key: str = "image", ckpt_path: str | None = None, ignore_keys: tuple[str, ...] = (),
                 colorize_nlabels: int | None = None, attn_backend: str = "sdpa") -> None:
        super().__init__()
        if ckpt_path:
            raise ConfigError(f"AutoencoderKL: ckpt_path={ckpt_path!r} is not supported in a config; load weights "
                              "with ldm.load(checkpoint, config) or ldm.checkpoint instead")
        cfg = check_ddconfig(ddconfig)
        check_backend(attn_backend)
        if lossconfig:
            log.debug("AutoencoderKL: lossconfig is not read by the model (the autoencoder stage reads it)")
        self.ddconfig, self.embed_dim = cfg, int(embed_dim)
        self.monitor, self.image_key, self.ignore_keys = monitor, image_key, tuple(ignore_keys)
        self.colorize_nlabels = colorize_nlabels
        self.encoder = Encoder(**{k: cfg[k] for k in ENCODER_KEYS if k in cfg}, attn_backend=attn_backend)
        self.decoder = Decoder(**{k: cfg[k] for k in DECODER_KEYS if k in cfg}, attn_backend=attn_backend)
        z = cfg["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z, 2 * self.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(self.embed_dim, z, 1)
        # Non-persistent: SD checkpoints have no such keys; the values live in the config (model.params).
        self.register_buffer("scale_factor", torch.tensor(float(scale_factor), dtype=torch.float32), persistent=False)
        self.register_buffer("shift_factor", torch.tensor(float(shift_factor), dtype=torch.float32), persistent=False)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "AutoencoderKL":
        # .half()/.to(dtype) must not round the latent statistics: keep them fp32 whatever the weights' dtype.
        stats = self.scale_factor.detach().clone(), self.shift_factor.detach().clone()
        super()._apply(fn, recurse)
        device = self.scale_factor.device
        self.scale_factor, self.shift_factor = (s.to(device=device, dtype=torch.float32) for s in stats)
        return self

    @property
    def downsample_factor(self) -> int:
        """f: image pixels per latent pixel along each side (8 for SD)."""
        return 2 ** (len(self.ddconfig["ch_mult"]) - 1)

    def set_attention_backend(self, name: str) -> None:
        """Switch every attention block to ``name`` ("sdpa", "xformers" or "math")."""
        check_backend(name)
        for m in self.modules():
            if isinstance(m, AttnBlock):
                m.attn_backend = name

    def get_last_layer(self) -> torch.Tensor:
        """The decoder's last conv weight, where the GAN loss's adaptive weight is measured."""
        return self.decoder.conv_out.weight

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """x (B, 3, H, W) in [-1, 1] -> q(z|x) with mean/logvar (B, embed_dim, H/f, W/f)."""
        moments = self.quant_conv(self.encoder(x))  # (B, 2·embed_dim, H/f, W/f)
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: torch.Tensor, tile: int | None = None, overlap: int | None = None) -> torch.Tensor:
        """z (B, embed_dim, h, w) -> x (B, 3, h·f, w·f), roughly in [-1, 1].

        With ``tile`` (in latent pixels), the latent is decoded in overlapping ``tile``×``tile`` pieces that are
        blended with linear ramps over ``overlap`` latent pixels (default ``tile // 4``); this bounds memory for
        large images. The blending itself is exact (a decoder without spatial context is reproduced to 1e-6), but
        each tile's GroupNorm statistics and mid-block attention see only that tile, so the result is not the full
        decode: on the random-weight test model (tests/test_autoencoder.py) the mean absolute difference is ~8-10%
        of the mean output magnitude with 32-pixel tiles (overlap 8) of a 40×40 or 48×48 latent, ~35% with
        16-pixel tiles: use the largest tile that fits.
        Seam error on trained SD weights has not been measured here.
        """
        h, w = z.shape[-2:]
        if tile is None or (h <= tile and w <= tile):
            return self.decoder(self.post_quant_conv(z))
        return self._decode_tiled(z, int(tile), tile // 4 if overlap is None else int(overlap))

    def _decode_tiled(self, z: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
        if not 0 <= overlap < tile:
            raise ValueError(f"overlap must be in [0, tile={tile}), got {overlap}")
        f, (h, w) = self.downsample_factor, z.shape[-2:]
        out = weight = None
        for y0 in _tile_starts(h, tile, overlap):
            for x0 in _tile_starts(w, tile, overlap):
                zt = z[..., y0:y0 + tile, x0:x0 + tile]  # (B, C, ≤tile, ≤tile)
                xt = self.decoder(self.post_quant_conv(zt))  # (B, 3, ≤tile·f, ≤tile·f)
                if out is None:
                    out = xt.new_zeros(*xt.shape[:2], h * f, w * f)
                    weight = xt.new_zeros(h * f, w * f)
                wy = _ramp(y0, zt.shape[-2], h, overlap, f, xt)
                wx = _ramp(x0, zt.shape[-1], w, overlap, f, xt)
                wt = wy[:, None] * wx[None, :]  # (th·f, tw·f)
                ys, xs = slice(y0 * f, y0 * f + xt.shape[-2]), slice(x0 * f, x0 * f + xt.shape[-1])
                out[..., ys, xs] += xt * wt
                weight[ys, xs] += wt
        return out / weight

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """Reconstruct x (B, 3, H, W) -> (x_rec (B, 3, H, W), posterior); z is sampled or the posterior mode."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def encode_latents(self, x: torch.Tensor, sample: bool = False,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> the diffusion model's latents scale·(z − shift), (B, C, H/f, W/f)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return (z - self.shift_factor) * self.scale_factor

    def decode_latents(self, z: torch.Tensor, tile: int | None = None, overlap: int | None = None) -> torch.Tensor:
        """Inverse of :meth:`encode_latents`: scaled latents (B, C, h, w) -> images (B, 3, h·f, w·f)."""
        return self.decode(z / self.scale_factor + self.shift_factor, tile=tile, overlap=overlap)

    def decode_latents_tiled(self, z: torch.Tensor, tile: int, overlap: int | None = None) -> torch.Tensor:
        """:meth:`decode_latents` in overlapping tiles (see :meth:`decode`)."""
        return self.decode_latents(z, tile=tile, overlap=overlap)


def _tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of length ``tile`` with stride ``tile - overlap``; the last one ends at ``n``."""
    if n <= tile:
        return [0]
    starts = list(range(0, n - tile, tile - overlap))
    return starts + [n - tile]


def _ramp(start: int, size: int, n: int, overlap: int, f: int, like: torch.Tensor) -> torch.Tensor:
    """1-D blend weights (size·f,) of one tile: linear ramps over ``overlap·f`` pixels at interior edges."""
    r = torch.ones(size * f, device=like.device, dtype=like.dtype)
    m = min(overlap * f, size * f)
    if m == 0:
        return r
    ramp = (torch.arange(m, device=like.device, dtype=like.dtype) + 0.5) / m  # (m,) in (0, 1)
    if start > 0:
        r[:m] = ramp
    if start + size < n:
        r[-m:] = torch.minimum(r[-m:], ramp.flip(0))
    return r
