"""What :func:`ldm.load` adds on top of a checkpoint: LoRA files, a separate autoencoder, CLIP skip."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from omegaconf import open_dict

from ldm.checkpoint import CheckpointError, read_state_dict
from ldm.loading import fit_one_by_one

log = logging.getLogger(__name__)
VAE_PREFIX = "first_stage_model."
VAE_EXTRAS = ("loss.", "model_ema.")  # the released autoencoder .ckpt files carry their training loss (LPIPS, disc.)


def attach_lora(model: Any, path: str | Path, merge: bool = False, scale: float = 1.0) -> None:
    """Add the LoRA in ``path`` to ``model`` at strength ``scale``.

    Our own adapter files (keys ``model.diffusion_model.….lora_A``) are attached to ``model.model`` (merged with
    ``merge``); kohya-ss and diffusers/peft files are merged into the U-Net and the text encoder
    (:mod:`ldm.lora_formats`).
    """
    from ldm.lora import LoRALinear, load_lora, merge_lora  # noqa: PLC0415
    from ldm.lora_formats import is_ldm_lora, merge_lora_file  # noqa: PLC0415

    sd, meta = read_state_dict(path)
    if not is_ldm_lora(sd):
        try:
            merge_lora_file(model, sd, scale, meta)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: {e}") from None
        refresh_fused(model)
        return
    bad = [k for k in sd if not k.startswith("model.")]
    if bad:
        raise CheckpointError(f"{path}: not a LoRA file of this project (unexpected key {bad[0]!r})")
    ours = {k[len("model."):]: v for k, v in sd.items()}
    try:
        load_lora(model.model, ours)
    except (KeyError, AttributeError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: does not fit this model's U-Net ({e})") from None
    for name in {k.rsplit(".", 1)[0] for k in ours if k.endswith("lora_A")}:
        m = model.model.get_submodule(name)
        if isinstance(m, LoRALinear):
            m.scale *= scale
    if merge:
        log.info("merged %d LoRA adapters into the U-Net", merge_lora(model.model))
        refresh_fused(model)


def refresh_fused(model: Any) -> None:
    """Rebuild the U-Net's inference copies of its weights (fused q/k/v, hoisted conditioning projections: see
    :func:`ldm.fast.optimize`) after its weights changed in place, as a merged LoRA changes them: the copies would
    otherwise keep the old values and the merge would be silently lost in the fused matmuls."""
    unet = model.unet
    fused = any(getattr(m, "fuse_requested", False) for m in unet.modules())
    hoisted = unet.hoist_kv_weight is not None or unet.hoist_emb_weight is not None
    if fused:
        unet.fuse_projections()
    elif hoisted:
        unet.hoist_conditioning()
    if fused or hoisted:
        log.info("rebuilt the U-Net's fused projections from the merged weights")


def attach_loras(model: Any, lora: Any, scale: Any, merge: bool) -> None:
    """One file or a list of them, with one strength for all or one each; two or more are merged in turn."""
    paths = [lora] if isinstance(lora, (str, Path)) else list(lora)
    many = isinstance(scale, (list, tuple))
    scales = [float(s) for s in scale] if many else [float(scale)] * len(paths)
    if len(scales) != len(paths):
        raise ValueError(f"lora_scale has {len(scales)} value(s) for {len(paths)} LoRA file(s)")
    if not all(math.isfinite(s) for s in scales):
        raise ValueError(f"lora_scale must be finite, got {scales}")
    for p, s in zip(paths, scales):
        attach_lora(model, p, merge or len(paths) > 1, s)


def load_vae(model: Any, path: str | Path) -> None:
    """Replace the autoencoder's weights with those in ``path``: an autoencoder file (original layout, as
    ``vae-ft-mse-840000-ema-pruned``), a whole SD checkpoint (its ``first_stage_model.*``) or diffusers'
    ``AutoencoderKL`` keys. Strict: a missing, unexpected or misshapen tensor is an error naming the file."""
    sd, _ = read_state_dict(path)
    if any(k.startswith(VAE_PREFIX) for k in sd):
        sd = {k[len(VAE_PREFIX):]: v for k, v in sd.items() if k.startswith(VAE_PREFIX)}
    sd = {k: v for k, v in sd.items() if not k.startswith(VAE_EXTRAS)}
    vae = model.first_stage_model
    if any(k.startswith("encoder.down_blocks.") for k in sd):
        from ldm.convert.diffusers_vae import vae_diffusers_to_ldm  # noqa: PLC0415

        try:
            sd = vae_diffusers_to_ldm(sd, model.config.model.params.first_stage_config.params.ddconfig)
        except KeyError as e:
            raise CheckpointError(f"{path}: {e}") from None
    own = vae.state_dict()
    sd = fit_one_by_one(sd, own, str(path))
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    bad = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or bad:
        raise CheckpointError(f"{path} does not fit the autoencoder: {len(missing)} missing (e.g. {missing[:2]}), "
                              f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}), {len(bad)} of another shape "
                              f"(e.g. {bad[:2]})")
    vae.load_state_dict(sd)
    log.info("autoencoder weights from %s (%d tensors)", path, len(sd))


def set_clip_skip(model: Any, clip_skip: int) -> None:
    """Condition on the text encoder's last (1) or penultimate (2) layer, then its final LayerNorm (the web UIs'
    "CLIP skip", counted from the encoder's real last layer: SD 1.x conditions on 1, SD 2.x on 2); the config
    records it, so that a saved model keeps it."""
    layers = {1: "last", 2: "penultimate"}
    if clip_skip not in layers:
        raise ValueError(f"clip_skip must be 1 (last layer) or 2 (penultimate), got {clip_skip!r}")
    enc = model.cond_stage_model
    if not hasattr(enc, "layer"):
        raise ValueError(f"clip_skip: the text encoder {type(enc).__name__} has no selectable layer")
    last = enc.model.transformer.resblocks[-1]
    if clip_skip == 1 and not any(bool(p.any()) for p in last.parameters()):
        raise ValueError("clip_skip=1: this text encoder's last layer is not in its weights (zeros: a diffusers folder "
                         "holds only the layers the model conditions on); the model uses the penultimate layer")
    enc.layer = layers[clip_skip]
    cs = model.config.model.params.cond_stage_config
    with open_dict(cs):
        if cs.get("params") is None:
            cs.params = {}
        cs.params.layer = enc.layer
    log.info("text conditioning from the %s layer (clip_skip=%d)", enc.layer, clip_skip)


def load_embeddings(model: Any, embeddings: Any) -> None:
    """Textual-inversion files: a path, a list of paths or (name, path) pairs, or {name: path}; a file without a
    given name is named by :func:`ldm.conditioning.embeddings.read_embedding`."""
    from ldm.conditioning.embeddings import read_embedding  # noqa: PLC0415

    entries = [embeddings] if isinstance(embeddings, (str, Path)) else embeddings
    items = (list(entries.items()) if isinstance(entries, dict)
             else [e if isinstance(e, tuple) else (None, e) for e in entries])
    enc = model.cond_stage_model
    if not hasattr(enc, "add_embedding"):
        raise ValueError(f"embeddings: the text encoder {type(enc).__name__} takes no textual-inversion vectors")
    for name, path in items:
        name, vectors = read_embedding(path, name)
        try:
            enc.add_embedding(name, vectors)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
        log.info("embedding %r: %d vector(s) from %s", name, vectors.shape[0], path)
