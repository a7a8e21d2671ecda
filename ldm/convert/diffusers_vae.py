"""KL autoencoder: the original LDM ``AutoencoderKL`` layout ⇄ diffusers ``AutoencoderKL``, keys and config.

    encoder.down.i.block.j           encoder.down_blocks.i.resnets.j        (nin_shortcut → conv_shortcut)
    encoder.down.i.downsample.conv   encoder.down_blocks.i.downsamplers.0.conv
    {en,de}coder.mid.block_1 / _2    {en,de}coder.mid_block.resnets.0 / 1
    {en,de}coder.mid.attn_1          {en,de}coder.mid_block.attentions.0    (norm → group_norm, q/k/v → to_q/k/v,
                                                                            proj_out → to_out.0; 1×1 conv ⇄ Linear)
    decoder.up.i.block.j             decoder.up_blocks.(L-1-i).resnets.j   (LDM numbers up blocks from the bottom)
    decoder.up.i.upsample.conv       decoder.up_blocks.(L-1-i).upsamplers.0.conv
    {en,de}coder.norm_out            {en,de}coder.conv_norm_out
    quant_conv, post_quant_conv, conv_in, conv_out: unchanged.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import torch

from ldm.convert.diffusers_unet import DIFFUSERS_FORMAT_VERSION
from ldm.convert.keymap import KeyMap

log = logging.getLogger(__name__)

VAE_RESNET_RENAMES = {"nin_shortcut": "conv_shortcut"}
VAE_ATTN_RENAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# diffusers < 0.14 saved the VAE mid attention under these names; diffusers still reads them, and so do we
_DEPRECATED_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _check_ddconfig(dd: Mapping[str, Any]) -> None:
    if list(dd.get("attn_resolutions", [])):
        raise NotImplementedError(f"ddconfig: attn_resolutions={list(dd['attn_resolutions'])} (attention inside "
                                  "down/up blocks) has no diffusers AutoencoderKL equivalent; only [] is supported")
    if not dd.get("double_z", True):
        raise NotImplementedError("ddconfig: double_z=False has no diffusers AutoencoderKL equivalent")
    if dd.get("attn_type", "vanilla") not in ("vanilla", "vanilla-xformers"):
        raise NotImplementedError(f"ddconfig: attn_type={dd['attn_type']!r} is not supported")
    for key in ("tanh_out", "give_pre_end", "use_linear_attn"):
        if dd.get(key, False):
            raise NotImplementedError(f"ddconfig: {key}=True has no diffusers AutoencoderKL equivalent")
    if not dd.get("resamp_with_conv", True):
        raise NotImplementedError("ddconfig: resamp_with_conv=False has no diffusers AutoencoderKL equivalent")


def vae_keymap(ddconfig: Mapping[str, Any]) -> KeyMap:
    """The module-prefix map LDM → diffusers for a KL autoencoder with this ``ddconfig``."""
    _check_ddconfig(ddconfig)
    n_levels = len(ddconfig["ch_mult"])
    nres = int(ddconfig["num_res_blocks"])
    km = KeyMap()
    for part in ("encoder", "decoder"):
        km.add(f"{part}.conv_in", f"{part}.conv_in")
        km.add(f"{part}.conv_out", f"{part}.conv_out")
        km.add(f"{part}.norm_out", f"{part}.conv_norm_out")
        km.add(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", VAE_RESNET_RENAMES)
        km.add(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", VAE_RESNET_RENAMES)
        km.add(f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", VAE_ATTN_RENAMES,
               conv_to_linear=("q", "k", "v", "proj_out"))
    for i in range(n_levels):
        for j in range(nres):
            km.add(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", VAE_RESNET_RENAMES)
        if i != n_levels - 1:
            km.add(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
        u = n_levels - 1 - i
        for j in range(nres + 1):
            km.add(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{u}.resnets.{j}", VAE_RESNET_RENAMES)
        if i != 0:
            km.add(f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{u}.upsamplers.0.conv")
    km.add("quant_conv", "quant_conv")
    km.add("post_quant_conv", "post_quant_conv")
    return km


def vae_ldm_to_diffusers(sd: Mapping[str, torch.Tensor], ddconfig: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """VAE state dict without the ``first_stage_model.`` prefix → diffusers ``AutoencoderKL`` keys."""
    return vae_keymap(ddconfig).forward(sd, "VAE (LDM layout)")


def vae_diffusers_to_ldm(sd: Mapping[str, torch.Tensor], ddconfig: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` state dict (also the pre-0.14 attention names) → original LDM VAE keys."""
    return vae_keymap(ddconfig).backward(_modern_attention_names(sd), "VAE (diffusers layout)")


def _modern_attention_names(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        head, _, leaf = k.rpartition(".")
        parent, _, name = head.rpartition(".")
        if ".mid_block.attentions." in k and name in _DEPRECATED_ATTN:
            k = f"{parent}.{_DEPRECATED_ATTN[name]}.{leaf}"
        out[k] = v
    return out


# ---------------------------------------------------------------------------------------------------- configs
def vae_config_to_diffusers(ddconfig: Mapping[str, Any], embed_dim: int, scaling_factor: float,
                            shift_factor: float = 0.0, sample_size: int | None = None) -> dict[str, Any]:
    """ddconfig (+ ``embed_dim``, the latent scale/shift) → a diffusers ``AutoencoderKL`` ``config.json`` dict.

    diffusers' quant_conv maps 2·latent → 2·latent channels, so ``embed_dim`` must equal ``z_channels``.
    """
    _check_ddconfig(ddconfig)
    if int(embed_dim) != int(ddconfig["z_channels"]):
        raise NotImplementedError(f"embed_dim={embed_dim} differs from ddconfig.z_channels={ddconfig['z_channels']}; "
                                  "diffusers AutoencoderKL needs them equal")
    n = len(ddconfig["ch_mult"])
    if shift_factor:
        log.warning("VAE shift_factor %.6g is written to vae/config.json, but diffusers' StableDiffusionPipeline "
                    "ignores it (only SD3/Flux pipelines subtract it)", shift_factor)
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_FORMAT_VERSION, "act_fn": "silu",
        "block_out_channels": [int(ddconfig["ch"]) * m for m in ddconfig["ch_mult"]],
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "in_channels": int(ddconfig["in_channels"]), "out_channels": int(ddconfig["out_ch"]),
        "latent_channels": int(ddconfig["z_channels"]), "layers_per_block": int(ddconfig["num_res_blocks"]),
        "norm_num_groups": 32,
        "sample_size": int(sample_size if sample_size is not None else ddconfig.get("resolution", 256)),
        "scaling_factor": float(scaling_factor), "shift_factor": float(shift_factor) if shift_factor else None,
        "force_upcast": True,
    }


def vae_config_from_diffusers(cfg: Mapping[str, Any], where: str = "vae/config.json") -> dict[str, Any]:
    """A diffusers ``AutoencoderKL`` config → ``{"embed_dim", "ddconfig", "scale_factor", "shift_factor"}``."""
    for key, want in (("act_fn", "silu"), ("norm_num_groups", 32), ("use_quant_conv", True),
                      ("use_post_quant_conv", True), ("mid_block_add_attention", True), ("latents_mean", None)):
        if key in cfg and cfg[key] != want:
            raise NotImplementedError(f"{where}: {key}={cfg[key]!r} is not supported (only {want!r})")
    for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        bad = [t for t in cfg.get(key, []) if t != want]
        if bad:
            raise NotImplementedError(f"{where}: {key} entries {bad} are not supported (only {want})")
    channels = [int(c) for c in cfg.get("block_out_channels", [64])]
    ch = channels[0]
    if any(c % ch for c in channels):
        raise NotImplementedError(f"{where}: block_out_channels {channels} are not multiples of the first")
    z = int(cfg.get("latent_channels", 4))
    dd = {"double_z": True, "z_channels": z, "resolution": int(cfg.get("sample_size") or 256),
          "in_channels": int(cfg.get("in_channels", 3)), "out_ch": int(cfg.get("out_channels", 3)), "ch": ch,
          "ch_mult": [c // ch for c in channels], "num_res_blocks": int(cfg.get("layers_per_block", 1)),
          "attn_resolutions": [], "dropout": 0.0}
    return {"embed_dim": z, "ddconfig": dd, "scale_factor": float(cfg.get("scaling_factor", 0.18215)),
            "shift_factor": float(cfg.get("shift_factor") or 0.0)}
