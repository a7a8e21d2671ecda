"""The text encoder trained with the U-Net: ``model.params.cond_stage_trainable: true`` (the original LDM key).

The original ``LatentDiffusion.configure_optimizers`` adds the text encoder's parameters to the U-Net's when the key
is set (its text-to-image LDM on LAION trained its BERT so). Here the same key does the same in the diffusion stage:

- the text encoder's parameters that its context depends on train, with the U-Net's, in one AdamW, at
  ``train.text_encoder_lr`` (default ``train.lr``; scaled by ``train.lr_scale`` as that is); the ones it never
  reads stay frozen, found by one backward pass through it at set-up (the last block of an encoder whose context is
  its penultimate layer, a text projection), so that DDP has no parameter without a gradient;
- captions are encoded with gradients every step; caption dropout replaces a row by the encoding of "" made in the
  same call (the current weights', not a cached one);
- gradient clipping and the non-finite check act on all the trained parameters together; the EMA keeps the U-Net's
  weights only, as the original's does; the export holds the trained text encoder.

Refused, naming the key: LoRA (``train.lora`` adapts the U-Net; with the key the whole text encoder would train
beside it), and latent caches that hold token states (``data.train``/``data.val`` from ``scripts/cache_latents.py``
with the text encoder: they hold a frozen encoder's contexts).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig

from ldm.registry import ConfigError

log = logging.getLogger(__name__)

KEY = "model.params.cond_stage_trainable"


def text_encoder_trainable(config: DictConfig) -> bool:
    """Whether the config asks for the text encoder to train with the U-Net (``model.params.cond_stage_trainable``)."""
    value = ((config.get("model") or {}).get("params") or {}).get("cond_stage_trainable", False)
    if not isinstance(value, bool):
        raise ConfigError(f"{KEY}: expected true or false, got {value!r}")
    return value


def check_joint_text_config(config: DictConfig) -> None:
    """The refusals of the module docstring, and ``train.text_encoder_lr`` without the key (it would be ignored)."""
    t = config.get("train") or {}
    if not text_encoder_trainable(config):
        if t.get("text_encoder_lr") is not None:
            raise ConfigError(f"train.text_encoder_lr is set but {KEY} is not true: the text encoder is frozen and the "
                              f"rate would be ignored; set {KEY}: true to train it, or drop train.text_encoder_lr")
        return
    if lora_on(t):
        raise ConfigError(f"{KEY}: true with train.lora: the adapters train the U-Net, and the whole text encoder "
                          "would train beside them; use one or the other")
    refuse_token_state_caches(config, f"{KEY}: true", "made by the frozen text encoder")


def lora_on(train: Any) -> bool:
    """Whether the ``train`` section asks for LoRA adapters (``train.lora.rank`` > 0)."""
    return int((train.get("lora") or {}).get("rank") or 0) > 0


def refuse_token_state_caches(config: DictConfig, setting: str, why: str) -> None:
    """``data.train``/``data.val`` latent caches holding token states cannot serve a run whose captions must be
    encoded anew (``setting``, ``why``): refused, naming the key."""
    for key in ("train", "val"):
        spec = (config.get("data") or {}).get(key)
        if holds_token_states(spec):
            raise ConfigError(f"{setting} but data.{key}={spec!r} is a latent cache holding the captions' token "
                              f"states, {why}; train from images, or cache the latents without them "
                              "(scripts/cache_latents.py without the text encoder)")


def holds_token_states(spec: Any) -> bool:
    """Whether the data spec is a latent cache whose manifest records the text encoder (cached token states)."""
    from ldm.data.shards import has_manifest, read_manifest  # noqa: PLC0415

    if not isinstance(spec, str) or not has_manifest(spec):
        return False
    manifest = read_manifest(spec)
    encoders = (manifest.get("extra") or {}).get("encoders") or {}
    return manifest.get("kind") == "latents" and bool(manifest.get("context_shape") or "cond_stage_model" in encoders)


def unfreeze_text_encoder(encoder: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Make ``encoder`` trainable: training mode, gradients for the parameters its context reads (found by a
    backward pass of one empty prompt), none for the others; returns the trainable ones."""
    if hasattr(encoder, "frozen"):
        encoder.frozen = False  # the encoders' train() keeps a frozen one in eval mode
    encoder.train()
    params = list(encoder.parameters())
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    with torch.enable_grad():
        encoder([""]).float().sum().backward()
    used = [p for p in params if p.grad is not None]
    for p in params:
        p.requires_grad_(p.grad is not None)
        p.grad = None
    if not used:
        raise ConfigError(f"{KEY}: true but {type(encoder).__name__} has no parameter its context depends on")
    log.info("%s: the text encoder trains: %d of its %d tensors (%.1f M of %.1f M parameters; the rest is not read "
             "by its context)", KEY, len(used), len(params), sum(p.numel() for p in used) / 1e6,
             sum(p.numel() for p in params) / 1e6)
    return used
