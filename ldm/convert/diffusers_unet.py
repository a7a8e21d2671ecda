"""U-Net: the original LDM ``UNetModel`` layout ⇄ diffusers ``UNet2DConditionModel``, keys and config.

The mapping is generated from the architecture (the original YAML ``unet_config.params``), block by block, exactly as
``openaimodel.UNetModel.__init__`` numbers its ``input_blocks`` / ``output_blocks``:

    input_blocks.0.0                 conv_in
    input_blocks.k.0 / .k.1          down_blocks.i.resnets.j / down_blocks.i.attentions.j
    input_blocks.k.0.op              down_blocks.i.downsamplers.0.conv
    middle_block.0 / .1 / .2         mid_block.resnets.0 / mid_block.attentions.0 / mid_block.resnets.1
    output_blocks.k.0 / .k.1         up_blocks.u.resnets.j / up_blocks.u.attentions.j   (u = levels - 1 - level)
    output_blocks.k.{1|2}.conv       up_blocks.u.upsamplers.0.conv
    time_embed.0 / .2, out.0 / .2    time_embedding.linear_1 / _2, conv_norm_out / conv_out

Inside a ResBlock ``in_layers.0/2, emb_layers.1, out_layers.0/3, skip_connection`` become ``norm1, conv1,
time_emb_proj, norm2, conv2, conv_shortcut``; a SpatialTransformer has the same inner names in both layouts.
No tensor changes shape. Library code never imports diffusers.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import torch

from ldm.convert.keymap import KeyMap

log = logging.getLogger(__name__)

RESNET_RENAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                  "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
# diffusers decides "SDXL-style addition embedding" from the context width (single_file_utils)
_ADDITION_EMBED_CONTEXTS = (2048, 1280)
DIFFUSERS_FORMAT_VERSION = "0.30.0"


def _per_level(value: Any, n: int, name: str) -> list[int]:
    if isinstance(value, int):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"unet params: {name} has {len(value)} entries, channel_mult has {n}")
    return [int(v) for v in value]


def _check_supported(p: Mapping[str, Any]) -> None:
    if not p.get("use_spatial_transformer", False):
        raise NotImplementedError("unet params: use_spatial_transformer=False (legacy AttentionBlock) has no diffusers "
                                  "UNet2DConditionModel equivalent")
    if p.get("resblock_updown", False):
        raise NotImplementedError("unet params: resblock_updown=True has no UNet2DConditionModel equivalent")
    if p.get("num_attention_blocks") is not None:
        raise NotImplementedError("unet params: num_attention_blocks is not supported by the diffusers conversion")
    if not p.get("conv_resample", True):
        raise NotImplementedError("unet params: conv_resample=False has no UNet2DConditionModel equivalent")


def _class_embed_kind(p: Mapping[str, Any]) -> str | None:
    """None, "class" (nn.Embedding), "projection" (adm vector) or "addition" (SDXL-style text_time)."""
    n = p.get("num_classes")
    if n is None:
        return None
    if n == "sequential":
        ctx = p.get("context_dim")
        ctx = ctx if isinstance(ctx, int) or ctx is None else list(ctx)[0]
        return "addition" if ctx in _ADDITION_EMBED_CONTEXTS else "projection"
    if isinstance(n, int):
        return "class"
    raise NotImplementedError(f"unet params: num_classes={n!r} is not supported (int or 'sequential')")


def unet_keymap(unet_params: Mapping[str, Any]) -> KeyMap:
    """The module-prefix map LDM → diffusers for a U-Net with these original YAML params."""
    p = dict(unet_params)
    _check_supported(p)
    mult = list(p["channel_mult"])
    n_levels = len(mult)
    nres = _per_level(p["num_res_blocks"], n_levels, "num_res_blocks")
    attn_res = set(p.get("attention_resolutions", []))
    km = KeyMap()
    km.add("time_embed.0", "time_embedding.linear_1")
    km.add("time_embed.2", "time_embedding.linear_2")
    km.add("input_blocks.0.0", "conv_in")
    km.add("out.0", "conv_norm_out")
    km.add("out.2", "conv_out")
    kind = _class_embed_kind(p)
    if kind == "class":
        km.add("label_emb", "class_embedding")
    elif kind is not None:
        name = "add_embedding" if kind == "addition" else "class_embedding"
        km.add("label_emb.0.0", f"{name}.linear_1")
        km.add("label_emb.0.2", f"{name}.linear_2")
    k, ds = 1, 1
    for level in range(n_levels):
        for j in range(nres[level]):
            km.add(f"input_blocks.{k}.0", f"down_blocks.{level}.resnets.{j}", RESNET_RENAMES)
            if ds in attn_res:
                km.add(f"input_blocks.{k}.1", f"down_blocks.{level}.attentions.{j}")
            k += 1
        if level != n_levels - 1:
            km.add(f"input_blocks.{k}.0.op", f"down_blocks.{level}.downsamplers.0.conv")
            k, ds = k + 1, ds * 2
    km.add("middle_block.0", "mid_block.resnets.0", RESNET_RENAMES)
    km.add("middle_block.1", "mid_block.attentions.0")
    km.add("middle_block.2", "mid_block.resnets.1", RESNET_RENAMES)
    k = 0
    for level in reversed(range(n_levels)):
        u = n_levels - 1 - level
        for j in range(nres[level] + 1):
            km.add(f"output_blocks.{k}.0", f"up_blocks.{u}.resnets.{j}", RESNET_RENAMES)
            idx = 1
            if ds in attn_res:
                km.add(f"output_blocks.{k}.1", f"up_blocks.{u}.attentions.{j}")
                idx = 2
            if level and j == nres[level]:
                km.add(f"output_blocks.{k}.{idx}.conv", f"up_blocks.{u}.upsamplers.0.conv")
                ds //= 2
            k += 1
    return km


def unet_ldm_to_diffusers(sd: Mapping[str, torch.Tensor], unet_params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """U-Net state dict without the ``model.diffusion_model.`` prefix → diffusers ``UNet2DConditionModel`` keys.

    Raises KeyError naming the keys that fit no block of the architecture.
    """
    return unet_keymap(unet_params).forward(sd, "U-Net (LDM layout)")


def unet_diffusers_to_ldm(sd: Mapping[str, torch.Tensor], unet_params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers ``UNet2DConditionModel`` state dict → original LDM U-Net keys (no ``model.diffusion_model.``)."""
    return unet_keymap(unet_params).backward(sd, "U-Net (diffusers layout)")


# ---------------------------------------------------------------------------------------------------- configs
def _heads(p: Mapping[str, Any]) -> int | list[int]:
    """diffusers' ``attention_head_dim`` (historically the number of heads): SD v1 8, SD v2 [5, 10, 20, 20]."""
    nhc = p.get("num_head_channels", -1)
    if nhc is None or nhc == -1:
        return int(p["num_heads"])
    return [int(p["model_channels"] * m) // int(nhc) for m in p["channel_mult"]]


def unet_config_to_diffusers(unet_params: Mapping[str, Any], sample_size: int | None = None) -> dict[str, Any]:
    """Original UNetModel YAML params → a ``UNet2DConditionModel`` ``config.json`` dict.

    ``sample_size`` is the default latent size (64 for 512-px SD); it defaults to the params' ``image_size``.
    """
    p = dict(unet_params)
    _check_supported(p)
    mult = list(p["channel_mult"])
    attn_res = set(p.get("attention_resolutions", []))
    has_attn = [2 ** i in attn_res for i in range(len(mult))]
    nres = p["num_res_blocks"]
    depth = p.get("transformer_depth", 1)
    ctx = p.get("context_dim")
    ctx = ctx if ctx is None or isinstance(ctx, int) else int(list(ctx)[0])
    cfg: dict[str, Any] = {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
        "act_fn": "silu", "attention_head_dim": _heads(p),
        "block_out_channels": [p["model_channels"] * m for m in mult],
        "center_input_sample": False, "cross_attention_dim": ctx,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": int(p["in_channels"]),
        "layers_per_block": nres if isinstance(nres, int) else list(nres), "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-5, "norm_num_groups": 32,
        "out_channels": int(p["out_channels"]),
        "sample_size": int(sample_size if sample_size is not None else p.get("image_size", 64)),
        "transformer_layers_per_block": depth if isinstance(depth, int) else list(depth),
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)],
        "upcast_attention": bool(p.get("upcast_attention", False)),
        "use_linear_projection": bool(p.get("use_linear_in_transformer", False)),
    }
    if p.get("disable_self_attentions") is not None:
        cfg["only_cross_attention"] = list(p["disable_self_attentions"])
    kind = _class_embed_kind(p)
    if kind == "class":
        cfg["num_class_embeds"] = int(p["num_classes"])
    elif kind == "projection":
        cfg.update(class_embed_type="projection", projection_class_embeddings_input_dim=int(p["adm_in_channels"]))
    elif kind == "addition":
        cfg.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                   projection_class_embeddings_input_dim=int(p["adm_in_channels"]))
    return cfg


# what our params cannot express: (key, the only value we accept)
_UNET_FIXED = (("act_fn", "silu"), ("norm_num_groups", 32), ("flip_sin_to_cos", True), ("freq_shift", 0),
               ("center_input_sample", False), ("downsample_padding", 1), ("mid_block_scale_factor", 1),
               ("time_embedding_type", "positional"), ("resnet_time_scale_shift", "default"),
               ("mid_block_type", "UNetMidBlock2DCrossAttn"), ("dual_cross_attention", False),
               ("encoder_hid_dim", None), ("time_cond_proj_dim", None), ("conv_in_kernel", 3),
               ("conv_out_kernel", 3), ("attention_type", "default"), ("class_embeddings_concat", False),
               ("reverse_transformer_layers_per_block", None), ("time_embedding_dim", None),
               ("timestep_post_act", None), ("resnet_skip_time_act", False), ("resnet_out_scale_factor", 1.0))


def _check_fixed(cfg: Mapping[str, Any], where: str) -> None:
    for key, want in _UNET_FIXED:
        if key in cfg and cfg[key] != want:
            raise NotImplementedError(f"{where}: {key}={cfg[key]!r} is not supported (only {want!r})")
    if abs(float(cfg.get("norm_eps", 1e-5)) - 1e-5) > 1e-9:
        raise NotImplementedError(f"{where}: norm_eps={cfg['norm_eps']!r} is not supported (only 1e-05)")


def _levels_from_types(cfg: Mapping[str, Any], where: str) -> list[bool]:
    down = list(cfg["down_block_types"])
    up = list(cfg.get("up_block_types", []))
    has_attn = []
    for t in down:
        if t not in ("CrossAttnDownBlock2D", "DownBlock2D"):
            raise NotImplementedError(f"{where}: down_block_types entry {t!r} is not supported")
        has_attn.append(t == "CrossAttnDownBlock2D")
    want_up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)]
    if up and up != want_up:
        raise NotImplementedError(f"{where}: up_block_types {up} do not mirror down_block_types {down}")
    return has_attn


def _head_params(cfg: Mapping[str, Any], channels: list[int], where: str) -> dict[str, Any]:
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    heads = [int(heads)] * len(channels) if isinstance(heads, int) else [int(h) for h in heads]
    if len(set(heads)) == 1:
        return {"num_heads": heads[0], "num_head_channels": -1}
    dims = {c // h for c, h in zip(channels, heads)}
    if len(dims) == 1 and all(c % h == 0 for c, h in zip(channels, heads)):
        return {"num_head_channels": dims.pop()}
    raise NotImplementedError(f"{where}: attention heads {heads} fit neither a fixed head count nor a fixed head width")


def unet_config_from_diffusers(cfg: Mapping[str, Any], where: str = "unet/config.json") -> dict[str, Any]:
    """A ``UNet2DConditionModel`` config → original UNetModel YAML params (raises on what they cannot express)."""
    _check_fixed(cfg, where)
    channels = [int(c) for c in cfg["block_out_channels"]]
    base = channels[0]
    if any(c % base for c in channels):
        raise NotImplementedError(f"{where}: block_out_channels {channels} are not multiples of the first")
    has_attn = _levels_from_types(cfg, where)
    if cfg.get("addition_embed_type") is not None:
        raise NotImplementedError(f"{where}: addition_embed_type={cfg['addition_embed_type']!r} is not supported")
    lpb, depth = cfg.get("layers_per_block", 2), cfg.get("transformer_layers_per_block", 1)
    ctx = cfg.get("cross_attention_dim", 1280)
    p: dict[str, Any] = {
        "image_size": int(cfg.get("sample_size") or 64), "in_channels": int(cfg.get("in_channels", 4)),
        "out_channels": int(cfg.get("out_channels", 4)), "model_channels": base,
        "attention_resolutions": [2 ** i for i in reversed(range(len(has_attn))) if has_attn[i]],
        "num_res_blocks": lpb if isinstance(lpb, int) else list(lpb),
        "channel_mult": [c // base for c in channels], **_head_params(cfg, channels, where),
        "use_spatial_transformer": True, "transformer_depth": depth if isinstance(depth, int) else list(depth),
        "context_dim": ctx if isinstance(ctx, int) else int(list(ctx)[0]),
        "use_linear_in_transformer": bool(cfg.get("use_linear_projection", False)), "legacy": False,
    }
    if p["num_head_channels"] == -1:
        del p["num_head_channels"]
    if cfg.get("upcast_attention"):
        p["upcast_attention"] = True  # softmax in fp32 (SD 2.1 in fp16); our UNetModel's extra argument
    oca = cfg.get("only_cross_attention", False)
    if oca:
        p["disable_self_attentions"] = [bool(oca)] * len(channels) if isinstance(oca, bool) else list(oca)
    cet = cfg.get("class_embed_type")
    if cet == "projection":
        p.update(num_classes="sequential", adm_in_channels=int(cfg["projection_class_embeddings_input_dim"]))
    elif cet is not None:
        raise NotImplementedError(f"{where}: class_embed_type={cet!r} is not supported (only 'projection')")
    elif cfg.get("num_class_embeds") is not None:
        p["num_classes"] = int(cfg["num_class_embeds"])
    return p
