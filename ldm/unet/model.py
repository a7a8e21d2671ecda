"""The latent-diffusion U-Net ε_θ(z_t, t, c) of Rombach et al. 2022 (Stable Diffusion v1/v2).

A fresh implementation of the original LDM ``openaimodel.UNetModel`` with the same constructor arguments (as they
appear in SD YAMLs) and the same state-dict keys and shapes, so released U-Net weights (prefix
``model.diffusion_model.`` stripped) load with ``strict=True``::

    input_blocks:  [conv_in] + per level: num_res_blocks × (ResBlock [+ SpatialTransformer]) [+ Downsample]
    middle_block:  ResBlock, SpatialTransformer, ResBlock
    output_blocks: per level, reversed: (num_res_blocks + 1) × (ResBlock(cat skip) [+ SpatialTransformer])
                   [+ Upsample]
    out:           GroupNorm → SiLU → conv3×3
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.attention import check_backend
from ldm.norm import GroupNorm
from ldm.unet.attention import BasicTransformerBlock, CrossAttention, SpatialTransformer
from ldm.unet.blocks import (NORM_GROUPS, RESBLOCK_NORM_EPS, Downsample, Hoisted, ResBlock, TimestepEmbedSequential,
                             Upsample, repeat_batch, zero_module)
from ldm.unet.conv import Conv2d
from ldm.unet.embeddings import label_embedding, time_mlp, timestep_embedding

log = logging.getLogger(__name__)


def count_params(module: nn.Module) -> int:
    """Number of parameters of ``module`` (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())


def _as_list(value: Any) -> Any:
    """omegaconf ListConfig / tuples → list; scalars, strings and None unchanged."""
    if value is None or isinstance(value, (int, float, str, bytes)):
        return value
    return list(value)


def attention_heads(ch: int, num_heads: int, num_head_channels: int, legacy: bool) -> tuple[int, int]:
    """(n_heads, d_head) of a SpatialTransformer on ``ch`` channels, exactly as the original U-Net derives them.

    ``num_head_channels`` (a fixed head width, SD 2) wins over ``num_heads`` (a fixed head count, SD 1);
    with ``legacy`` the head width is recomputed as ch // n_heads.
    """
    if num_head_channels == -1:
        n_heads, d_head = num_heads, ch // num_heads
    else:
        n_heads, d_head = ch // num_head_channels, num_head_channels
    if legacy:
        d_head = ch // n_heads if n_heads > 0 else 0
    if n_heads < 1 or d_head < 1:
        raise ValueError(f"num_heads={num_heads}, num_head_channels={num_head_channels} give {n_heads} heads of "
                         f"width {d_head} on {ch} channels")
    return n_heads, d_head


def _validate(a: dict[str, Any]) -> None:
    """Reject options the original accepts but this implementation does not, naming the argument."""
    unsupported = {
        "dims": (a["dims"] != 2, "only 2-D U-Nets are implemented (dims=2)"),
        "n_embed": (a["n_embed"] is not None, "codebook-id prediction (n_embed) is not implemented"),
        "use_new_attention_order": (a["use_new_attention_order"], "only applies to AttentionBlock, not implemented"),
        "use_spatial_transformer": (not a["use_spatial_transformer"], "the plain AttentionBlock U-Net is not "
                                    "implemented; set use_spatial_transformer=True"),
    }
    for name, (bad, why) in unsupported.items():
        if bad:
            raise ValueError(f"{name}={a[name]!r}: {why}")
    if a["context_dim"] is None:
        raise ValueError("context_dim is required with use_spatial_transformer=True (the text-embedding width)")
    widths = a["context_dim"] if isinstance(a["context_dim"], (list, tuple)) else [a["context_dim"]]
    if len(set(widths)) > 1:
        raise ValueError(f"context_dim={list(widths)}: per-layer context widths are not supported (forward takes one "
                         "context for every cross-attention); give one width")
    if a["num_heads"] == -1 and a["num_head_channels"] == -1:
        raise ValueError("set num_heads or num_head_channels (both are -1)")
    if not isinstance(a["transformer_depth"], int) or a["transformer_depth"] < 1:
        raise ValueError(f"transformer_depth must be a positive int, got {a['transformer_depth']!r}")
    levels = len(a["channel_mult"])
    for name in ("num_res_blocks", "disable_self_attentions", "num_attention_blocks"):
        if isinstance(a[name], list) and len(a[name]) != levels:
            raise ValueError(f"{name} has {len(a[name])} entries but channel_mult has {levels} levels")
    for mult in a["channel_mult"]:
        if (a["model_channels"] * mult) % NORM_GROUPS:
            raise ValueError(f"model_channels={a['model_channels']} × channel_mult entry {mult} is not divisible by "
                             f"{NORM_GROUPS} (GroupNorm groups)")


class UNetModel(nn.Module):
    """The SD U-Net with the original constructor arguments; see the module docstring for the layout.

    Ours on top: ``attn_backend`` (one of :data:`ldm.attention.BACKENDS`) and ``upcast_attention`` (softmax in fp32),
    changeable later with :meth:`set_attention_backend`. ``use_fp16``/``use_bf16`` are accepted and ignored: the
    dtype is the caller's (``model.to(torch.bfloat16)`` or autocast).
    """

    def __init__(self, image_size: int | None = None, in_channels: int = 4, model_channels: int = 320,
                 out_channels: int = 4, num_res_blocks: int | Sequence[int] = 2,
                 attention_resolutions: Sequence[int] = (4, 2, 1), dropout: float = 0.0,
                 channel_mult: Sequence[int] = (1, 2, 4, 8), conv_resample: bool = True, dims: int = 2,
                 num_classes: int | str | None = None, use_checkpoint: bool = False, use_fp16: bool = False,
                 use_bf16: bool = False, num_heads: int = -1, num_head_channels: int = -1,
                 num_heads_upsample: int = -1, use_scale_shift_norm: bool = False, resblock_updown: bool = False,
                 use_new_attention_order: bool = False, use_spatial_transformer: bool = False,
                 transformer_depth: int = 1, context_dim: int | Sequence[int] | None = None, n_embed: int | None = None,
                 legacy: bool = True, disable_self_attentions: Sequence[bool] | None = None,
                 num_attention_blocks: Sequence[int] | None = None, disable_middle_self_attn: bool = False,
                 use_linear_in_transformer: bool = False, adm_in_channels: int | None = None,
                 attn_backend: str = "sdpa", upcast_attention: bool = False) -> None:
        given = dict(locals())  # the constructor arguments, before anything else is bound
        super().__init__()
        args = {k: _as_list(v) for k, v in given.items() if k not in ("self", "__class__")}
        _validate(args)
        check_backend(attn_backend)
        if use_fp16 or use_bf16:
            log.debug("UNetModel: use_fp16/use_bf16 ignored; cast the model or use autocast to pick the dtype")
        channel_mult = args["channel_mult"]
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        self.model_channels, self.channel_mult = model_channels, channel_mult
        self.downsampling = 2 ** (len(channel_mult) - 1)  # latent sides divisible by it need no resized upsampling
        self.attention_resolutions = args["attention_resolutions"]
        self.num_res_blocks = (args["num_res_blocks"] if isinstance(args["num_res_blocks"], list)
                               else [num_res_blocks] * len(channel_mult))
        self.num_classes, self.use_checkpoint = num_classes, use_checkpoint
        self.attn_backend, self.upcast_attention = attn_backend, upcast_attention
        self._attn_cfg = dict(num_heads=num_heads, num_head_channels=num_head_channels, legacy=legacy,
                              depth=transformer_depth, context_dim=args["context_dim"],
                              use_linear=use_linear_in_transformer)
        self._res_cfg = dict(dropout=dropout, use_scale_shift_norm=use_scale_shift_norm)
        self._disable_sa = args["disable_self_attentions"] or [False] * len(channel_mult)
        self._n_attn = args["num_attention_blocks"]

        self.time_embed_dim = 4 * model_channels
        self.time_embed = time_mlp(model_channels, self.time_embed_dim)
        if num_classes is not None:
            self.label_emb = label_embedding(num_classes, self.time_embed_dim, adm_in_channels)
        ch, skip_chans = self._build_input_blocks(conv_resample, resblock_updown)
        self.middle_block = TimestepEmbedSequential(
            self._res(ch, ch), self._transformer(ch, disable_middle_self_attn), self._res(ch, ch)
        )
        ch = self._build_output_blocks(ch, skip_chans, conv_resample, resblock_updown)
        self.out = nn.Sequential(
            GroupNorm(NORM_GROUPS, ch, eps=RESBLOCK_NORM_EPS), nn.SiLU(),
            zero_module(Conv2d(ch, out_channels, 3, padding=1)),
        )
        # Inference (fuse_projections): every ResBlock's time projection and every cross-attention's K/V
        # projection of the context, concatenated so that one matmul each serves the whole U-Net. Not saved.
        self.register_buffer("hoist_emb_weight", None, persistent=False)  # (Σ C_out_i, 4C)
        self.register_buffer("hoist_emb_bias", None, persistent=False)  # (Σ C_out_i,)
        self.register_buffer("hoist_kv_weight", None, persistent=False)  # (Σ 2·inner_j, context_dim)
        self._hoist_emb_sizes: list[int] = []
        self._hoist_kv_sizes: list[int] = []
        # whether any block reads the context (forward's repeat needs one), fixed by the architecture
        self._reads_context = any(isinstance(m, SpatialTransformer) for m in self.modules())
        # 2×2 average pooling (conv_resample=False, resblock_updown) floors each side: a side below 2^(levels − 1)
        # would reach 0 (a stride-2 convolution rounds up and takes any side)
        self._min_side = self.downsampling if any(isinstance(m, nn.AvgPool2d) for m in self.modules()) else 1

    # -- construction ------------------------------------------------------------------------------------------
    def _res(self, c_in: int, c_out: int, up: bool = False, down: bool = False) -> ResBlock:
        return ResBlock(c_in, self.time_embed_dim, out_channels=c_out, use_checkpoint=self.use_checkpoint,
                        up=up, down=down, **self._res_cfg)

    def _transformer(self, ch: int, disable_self_attn: bool) -> SpatialTransformer:
        cfg = self._attn_cfg
        n_heads, d_head = attention_heads(ch, cfg["num_heads"], cfg["num_head_channels"], cfg["legacy"])
        # no dropout: the original (and diffusers) apply the U-Net's ``dropout`` to the ResBlocks only
        return SpatialTransformer(ch, n_heads, d_head, depth=cfg["depth"],
                                  context_dim=cfg["context_dim"], disable_self_attn=disable_self_attn,
                                  use_linear=cfg["use_linear"], use_checkpoint=self.use_checkpoint,
                                  backend=self.attn_backend, upcast=self.upcast_attention)

    def _has_attention(self, ds: int, level: int, index: int) -> bool:
        """Attention at downsampling factor ``ds``; ``num_attention_blocks`` caps how many per level."""
        return ds in self.attention_resolutions and (self._n_attn is None or index < self._n_attn[level])

    def _block(self, c_in: int, c_out: int, ds: int, level: int, index: int) -> list[nn.Module]:
        layers: list[nn.Module] = [self._res(c_in, c_out)]
        if self._has_attention(ds, level, index):
            layers.append(self._transformer(c_out, self._disable_sa[level]))
        return layers

    def _build_input_blocks(self, conv_resample: bool, resblock_updown: bool) -> tuple[int, list[int]]:
        ch = self.model_channels
        blocks = [TimestepEmbedSequential(Conv2d(self.in_channels, ch, 3, padding=1))]
        skip_chans, ds = [ch], 1
        for level, mult in enumerate(self.channel_mult):
            for nr in range(self.num_res_blocks[level]):
                blocks.append(TimestepEmbedSequential(*self._block(ch, mult * self.model_channels, ds, level, nr)))
                ch = mult * self.model_channels
                skip_chans.append(ch)
            if level != len(self.channel_mult) - 1:
                down = self._res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample)
                blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2
        self.input_blocks = nn.ModuleList(blocks)
        self._bottom_ds = ds
        return ch, skip_chans

    def _build_output_blocks(self, ch: int, skip_chans: list[int], conv_resample: bool,
                             resblock_updown: bool) -> int:
        blocks, ds = [], self._bottom_ds
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(self.num_res_blocks[level] + 1):
                layers = self._block(ch + skip_chans.pop(), mult * self.model_channels, ds, level, i)
                ch = mult * self.model_channels
                if level and i == self.num_res_blocks[level]:
                    layers.append(self._res(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample))
                    ds //= 2
                blocks.append(TimestepEmbedSequential(*layers))
        self.output_blocks = nn.ModuleList(blocks)
        return ch

    # -- run-time switches -------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype (inputs are cast to it, the output back to the input's)."""
        return self.time_embed[0].weight.dtype

    def set_attention_backend(self, backend: str, upcast: bool | None = None) -> None:
        """Switch every attention module to ``backend`` (:data:`ldm.attention.BACKENDS`); ``upcast`` if given."""
        check_backend(backend)
        self.attn_backend = backend
        if upcast is not None:
            self.upcast_attention = upcast
        for m in self.modules():
            if isinstance(m, CrossAttention):
                m.backend = backend
                if upcast is not None:
                    m.upcast = upcast

    def fuse_projections(self, fuse: bool = True) -> None:
        """Inference: q/k/v projections of every attention as one matmul, and the projections of the
        conditioning hoisted out of the blocks (:meth:`hoist_conditioning`); ``False`` undoes both. The state dict
        is unchanged; call again after changing weights."""
        attn = [m for m in self.modules() if isinstance(m, CrossAttention)]
        if not fuse:
            self._unhoist()
            for m in attn:
                m.unfuse_projections()
            return
        self.hoist_conditioning()
        skipped = sum(not m.fuse_projections() for m in attn)
        if skipped:
            log.warning("fuse_projections: %d of %d attention modules have adapted projections (LoRA) and stay "
                        "unfused; merge the adapters (ldm.load(..., merge_lora=True)) to fuse them", skipped, len(attn))

    def hoist_conditioning(self, enable: bool = True) -> None:
        """Inference: compute emb_layers(emb) of every ResBlock as one matmul, and K, V of the context of every
        cross-attention as another, once per call at the top of :meth:`forward`, instead of ~22 and ~16 small
        matmuls inside the blocks (SD-1.5). Modules with adapted projections (LoRA) keep their own. A hoisted
        cross-attention drops its own fused [W_K; W_V]; ``False`` undoes the hoist and gives it back to those that
        :meth:`fuse_projections` fused (the others project K and V separately again)."""
        was_hoisted = self._unhoist()
        if not enable:
            for m in was_hoisted:
                if m.fuse_requested:
                    m.fuse_projections()
            return
        res = [m for m in self.modules() if isinstance(m, ResBlock)]
        cross = [m for m in self.modules() if isinstance(m, CrossAttention) and not m.is_self_attention]
        res = [m for m in res if type(m.emb_layers[1]) is nn.Linear and isinstance(m.emb_layers[0], nn.SiLU)]
        cross = [m for m in cross if type(m.to_k) is nn.Linear and type(m.to_v) is nn.Linear]
        if len({m.to_k.in_features for m in cross}) > 1:  # per-layer context widths: nothing to concatenate
            cross = []
        with torch.no_grad():
            if res:
                self.hoist_emb_weight = torch.cat([m.emb_layers[1].weight for m in res]).clone()
                self.hoist_emb_bias = torch.cat([m.emb_layers[1].bias for m in res]).clone()
            if cross:
                self.hoist_kv_weight = torch.cat([w for m in cross for w in (m.to_k.weight, m.to_v.weight)]).clone()
        for i, m in enumerate(res):
            m.hoist_index = i
        for j, m in enumerate(cross):
            m.hoist_index = j
            m.fused_weight = None  # its K/V come from hoist_kv_weight
        self._hoist_emb_sizes = [m.emb_layers[1].out_features for m in res]
        self._hoist_kv_sizes = [2 * m.to_k.out_features for m in cross]

    def _unhoist(self) -> list[CrossAttention]:
        """Drop the hoisted weights and every block's slot in them; returns the cross-attentions that had one."""
        blocks = [m for m in self.modules() if isinstance(m, (ResBlock, CrossAttention))]
        was_hoisted = [m for m in blocks if isinstance(m, CrossAttention) and m.hoist_index is not None]
        for m in blocks:
            m.hoist_index = None
        self.hoist_emb_weight = self.hoist_emb_bias = self.hoist_kv_weight = None
        self._hoist_emb_sizes, self._hoist_kv_sizes = [], []
        return was_hoisted

    def _hoisted(self, emb: torch.Tensor, context: torch.Tensor | None) -> Hoisted | None:
        """The :class:`Hoisted` projections of this call, or None when not hoisting."""
        if self.hoist_emb_weight is None and self.hoist_kv_weight is None:
            return None
        if self.training:
            raise RuntimeError("UNetModel: hoisted projections are for inference (stale once weights train); call "
                               "fuse_projections(False) before training")
        emb_out: tuple[torch.Tensor, ...] = ()
        if self.hoist_emb_weight is not None:
            e = F.linear(F.silu(emb), self.hoist_emb_weight, self.hoist_emb_bias)  # (B, Σ C_out_i)
            emb_out = e.split(self._hoist_emb_sizes, dim=1)  # (B, C_out_i) each
        kv: tuple[torch.Tensor, ...] = ()
        if self.hoist_kv_weight is not None and context is not None:
            kv = F.linear(context, self.hoist_kv_weight).split(self._hoist_kv_sizes, dim=-1)  # (B, L, 2·inner_j)
        return Hoisted(emb_out, kv)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Turn activation checkpointing of every ResBlock and transformer block on or off (training only)."""
        self.use_checkpoint = enabled
        for m in self.modules():
            if isinstance(m, (ResBlock, BasicTransformerBlock)):
                m.use_checkpoint = enabled

    # -- forward -----------------------------------------------------------------------------------------------
    def _embed(self, timesteps: torch.Tensor | float, y: torch.Tensor | None, batch: int,
               device: torch.device) -> torch.Tensor:
        """Time (+ label) embedding: (B, 4·model_channels) in the parameters' dtype."""
        t = torch.as_tensor(timesteps, device=device)
        t = t.expand(batch) if t.ndim == 0 else t
        if t.shape != (batch,):
            raise ValueError(f"timesteps must have shape ({batch},) or be a scalar, got {tuple(t.shape)}")
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(self.dtype))  # (B, 4C)
        if (y is None) != (self.num_classes is None):
            raise ValueError(f"y must be given if and only if num_classes is set (num_classes={self.num_classes!r})")
        if y is not None:
            if y.shape[0] != batch:
                raise ValueError(f"y has batch size {y.shape[0]}, x has {batch}")
            y = y.to(device) if isinstance(self.num_classes, int) else y.to(device, self.dtype)
            emb = emb + self.label_emb(y)  # (B, 4C)
        return emb

    supports_repeat = True  # forward(..., repeat=G): see below; DiscreteDenoiser and CFGDenoiser ask for it

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | float, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None, repeat: int = 1) -> torch.Tensor:
        """ε_θ(x, t, c).

        Args:
            x: (B, in_channels, H, W), any H and W; when not divisible by :attr:`downsampling`
                (2^(len(channel_mult) − 1)) each upsampling is resized to its skip's size, as diffusers does;
                with average-pool downsampling (``conv_resample=False``, ``resblock_updown``) each side must be at
                least :attr:`downsampling`.
            timesteps: (B,) float or integer timesteps, or a scalar for the whole batch.
            context: (B, L, context_dim) cross-attention tokens; (G·B, L, context_dim) with ``repeat=G``.
            y: (B,) class ids (int ``num_classes``), (B, adm_in_channels) ("sequential"), or (B, 1) ("continuous").
            repeat: G > 1 evaluates the same x, timesteps and y under G contexts, [context_1; ...; context_G] of B
                each, and returns (G·B, ...): what the call with x, timesteps and y repeated G times along the
                batch returns. Classifier-free guidance is G = 2 (the unconditional and the conditional
                prompt at the same x_t and t): every layer before the first one that reads the context (SD: the
                input convolution, the first ResBlock and the first self-attention, the largest one) runs once,
                at batch B, not twice.
        Returns:
            (B, out_channels, H, W) in ``x``'s dtype; (G·B, ...) with ``repeat=G``.
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        self._check_repeat(x.shape[0], context, repeat)
        if min(x.shape[-2:]) < self._min_side:
            raise ValueError(f"x is {tuple(x.shape[-2:])} (H, W): this U-Net downsamples by 2×2 average pooling "
                             f"{len(self.channel_mult) - 1} times, so each side must be at least {self._min_side}")
        emb = self._embed(timesteps, y, x.shape[0], x.device)  # (B, 4C)
        h = x.to(self.dtype)
        context = context.to(self.dtype) if context is not None else None
        hoisted = self._hoisted(emb, context)  # None unless fuse_projections()
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context, hoisted)  # (B, C_l, H_l, W_l)
            skips.append(h)
        h = self.middle_block(h, emb, context, hoisted)  # (B, C_bottom, H_bottom, W_bottom)
        odd = any(s % self.downsampling for s in x.shape[-2:])  # then each upsampling matches its skip's size
        for block in self.output_blocks:  # a skip from before the first context reader holds B items of G·B
            h = torch.cat([h, repeat_batch(skips.pop(), h.shape[0])], dim=1)
            size = tuple(skips[-1].shape[-2:]) if odd and skips else None
            h = block(h, emb, context, hoisted) if size is None else block(h, emb, context, hoisted, size=size)
        return self.out(h).to(x.dtype)  # (B, out_channels, H, W)

    def _check_repeat(self, batch: int, context: torch.Tensor | None, repeat: int) -> None:
        if not isinstance(repeat, int) or repeat < 1:
            raise ValueError(f"repeat must be a positive int, got {repeat!r}")
        if repeat > 1 and (context is None or not self._reads_context):
            raise ValueError("repeat > 1 shares x among several contexts: it needs a context and a U-Net with "
                             "cross-attention")
        if context is not None and context.shape[0] != batch * repeat:
            raise ValueError(f"context has batch size {context.shape[0]}, expected {batch * repeat} (x's {batch} "
                             f"× repeat {repeat})")
