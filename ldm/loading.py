"""``ldm.load`` and ``ldm.save``: one entry point for original SD checkpoints, original YAMLs and our own files."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from ldm.checkpoint import (
    DEPTH_MODEL_PREFIX,
    IGNORED_KEYS,
    META_CONFIG,
    SCHEDULE_BUFFERS,
    CheckpointError,
    apply_ema,
    config_from_metadata,
    detect_variant,
    read_state_dict,
    save_safetensors,
    split_ignored,
)
from ldm.config import find_config, load_config
from ldm.registry import ConfigError, instantiate

log = logging.getLogger(__name__)

SD_CONFIGS = {("v1", "eps"): "sd/v1-inference.yaml", ("v2", "eps"): "sd/v2-inference.yaml",
              ("v2", "v"): "sd/v2-inference-v.yaml"}


def _config_for(sd: dict[str, torch.Tensor], meta: dict[str, str]) -> DictConfig:
    own = config_from_metadata(meta)
    if own is not None:
        return OmegaConf.create(own)
    variant = detect_variant(sd)
    name = SD_CONFIGS[variant["version"], variant["parameterization"]]
    cfg = load_config(find_config(name))
    if variant["parameterization"] == "v":  # the 2.x v-models were trained at 768 px: their default size
        cfg.model.params.image_size = 96  # (the original YAML leaves 64 and asks the script for --H 768 --W 768)
    if variant["in_channels"] != 4:
        # inpainting (9 = latents + masked-image latents + mask) and depth (5) models concatenate their conditioning
        cfg.model.params.unet_config.params.in_channels = variant["in_channels"]
        cfg.model.params.conditioning_key = "hybrid"
    log.info("detected SD %s checkpoint (in_channels %d, %s-prediction); using %s", variant["version"],
             variant["in_channels"], variant["parameterization"], name)
    if variant["version"] == "v2":
        log.info("SD 2.x ε and v-prediction files have the same keys; told apart from the weights "
                 "(ldm.checkpoint.guess_v_prediction): pass config= to override")
    return cfg


def _sidecar_config(checkpoint: str | Path | None, meta: dict[str, str]) -> Path | None:
    """``model.yaml`` beside ``model.safetensors``/``.ckpt`` (the convention of the SD web UIs for files whose
    architecture is not the default), for a checkpoint that does not carry its own config."""
    if checkpoint is None or config_from_metadata(meta) is not None:
        return None
    side = Path(checkpoint).with_suffix(".yaml")
    return side if side.is_file() else None


def build(cfg: DictConfig | dict, where: str = "config") -> Any:
    """Build the model described by ``cfg.model`` (random weights) and attach the config to it."""
    cfg = OmegaConf.create(cfg) if not isinstance(cfg, DictConfig) else cfg
    if "model" not in cfg:
        raise ConfigError(f"{where}: no 'model' section")
    model = instantiate(cfg.model, f"{where}: model")
    model.config = cfg
    return model


def load(checkpoint: str | Path | None = None, config: str | Path | DictConfig | None = None,
         device: str | torch.device | None = None, dtype: torch.dtype | None = None,
         use_ema: bool = False, strict: bool = True, lora: str | Path | Sequence[str | Path] | None = None,
         merge_lora: bool = False, fast: bool = True, lora_scale: float | Sequence[float] = 1.0,
         vae: str | Path | None = None, clip_skip: int | None = None, embeddings: Any = None) -> Any:
    """Load a latent diffusion model.

    Args:
        checkpoint: ``.ckpt``/``.safetensors`` (original SD v1/v2 or ours), a diffusers pipeline folder, or None
            for random weights.
        config: our YAML or an original SD inference YAML; may be omitted when the checkpoint says enough (our
            files carry their config; else a ``.yaml`` of the same name beside the checkpoint is used; else SD
            v1/v2, ε or v, inpainting or not, are detected from keys, shapes and weights).
        device, dtype: where and in what precision the model lives.
        use_ema: load the ``model_ema.*`` weights of the U-Net instead of the raw ones.
        strict: no missing or unexpected keys beyond the documented extras (``ldm.checkpoint.IGNORED_KEYS`` and
            ``IGNORED_PREFIXES``; an SD 2 depth file's MiDaS estimator, ``depth_model.*``, is not loaded: a
            warning says so).
        lora: a LoRA file or a list of them: ours (``lora.safetensors`` of LoRA fine-tuning, attached to the
            U-Net; ``merge_lora=True`` folds it into the base weights), or kohya-ss / diffusers files (merged into
            the U-Net and the text encoder); ``lora_scale`` is the strength, one for all or one per file.
        vae: a separate autoencoder file to use instead of the checkpoint's (e.g. ``vae-ft-mse-840000``; the
            original layout, with or without ``first_stage_model.``, or diffusers' ``AutoencoderKL`` keys).
        clip_skip: 1 conditions on the text encoder's last layer, 2 on the penultimate (the web UIs' "CLIP skip";
            default: the config's).
        embeddings: textual-inversion files (a path, a list of paths or (name, path) pairs, or {name: path}); a
            file's name in a prompt stands for its vectors (given, else diffusers' "<token>", else the file's stem).
        fast: on a CUDA device, the safe part of the fast path: channels_last weights (cuDNN's fast convolution
            layout); compile and fused projections with :func:`ldm.fast.optimize`.
    Returns:
        :class:`ldm.model.LatentDiffusion` with ``unet``, ``vae``, ``text_encoder``, ``encode_text``, ``generate``
        and ``config``.
    """
    if checkpoint is None and config is None:
        raise ValueError("ldm.load needs a checkpoint, a config, or both")
    from ldm.addons import attach_loras, load_embeddings, load_vae, set_clip_skip  # noqa: PLC0415

    model = _load_model(checkpoint, config, use_ema, strict)
    if vae is not None:
        load_vae(model, vae)
    if clip_skip is not None:
        set_clip_skip(model, clip_skip)
    if embeddings is not None:
        load_embeddings(model, embeddings)
    if lora is not None:
        attach_loras(model, lora, lora_scale, merge_lora)
    model.eval()
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)  # ᾱ stays float64 (LatentDiffusion._apply)
    if fast and device is not None and torch.device(device).type == "cuda":
        _fast_defaults(model)
    return model


def _load_model(checkpoint: str | Path | None, config: str | Path | DictConfig | None, use_ema: bool,
                strict: bool) -> Any:
    """The model of a diffusers folder, or of a checkpoint file with its config (given, its own, a sidecar YAML or
    detected), or of a config alone (random weights); on the CPU in float32."""
    if checkpoint is not None and Path(checkpoint).is_dir():
        if not (Path(checkpoint) / "model_index.json").is_file():
            raise FileNotFoundError(f"{checkpoint} is a folder without model_index.json (not a diffusers pipeline)")
        from ldm.convert import import_diffusers  # noqa: PLC0415

        if use_ema:
            raise ValueError(f"use_ema: {checkpoint} is a diffusers folder, which holds one set of U-Net weights")
        return import_diffusers(checkpoint, strict=strict)
    sd, meta = read_state_dict(checkpoint) if checkpoint is not None else ({}, {})
    if isinstance(config, DictConfig):
        cfg = config
    elif config is not None:
        cfg = load_config(config)
    elif (side := _sidecar_config(checkpoint, meta)) is not None:
        log.info("using %s, the YAML beside the checkpoint", side)
        cfg, config = load_config(side), side
    else:
        try:
            cfg = _config_for(sd, meta)
        except CheckpointError as e:
            raise CheckpointError(f"{checkpoint}: {e}") from None
    model = build(cfg, str(config or checkpoint))
    if checkpoint is not None:
        load_weights(model, sd, use_ema=use_ema, strict=strict, where=str(checkpoint))
    return model


def _fast_defaults(model: Any) -> None:
    """channels_last for the U-Net and the autoencoder: the same model, without the NCHW→NHWC conversions cuDNN
    otherwise runs before each convolution (3.1 of 12.3 GPU-ms of an eager SD-1.5 U-Net step on an H200)."""
    for name in ("unet", "vae"):
        part = getattr(model, name, None)
        if isinstance(part, torch.nn.Module):
            part.to(memory_format=torch.channels_last)


def load_weights(model: torch.nn.Module, sd: dict[str, torch.Tensor], use_ema: bool = False, strict: bool = True,
                 where: str = "checkpoint") -> None:
    """Load a flat state dict in the original layout into ``model`` (see :func:`load`)."""
    if use_ema:
        sd = apply_ema(sd, [n for n, _ in model.model.named_parameters()])
    weights, extra = split_ignored(sd)
    _check_schedule(model, extra, where)
    _take_scale_factor(model, weights, where)
    n_loss = sum(k.startswith("loss.") for k in extra)
    if n_loss:
        log.info("%s: ignored %d autoencoder-loss keys (loss.*)", where, n_loss)
    _report_depth_model(extra, where)
    n_ema = 0 if use_ema else sum(k.startswith("model_ema.") and k not in IGNORED_KEYS for k in extra)
    if n_ema:
        log.info("%s: the raw U-Net weights are used, not the file's %d EMA weights (use_ema=True, --ema)", where,
                 n_ema)
    own = model.state_dict()
    weights = fit_one_by_one(weights, own, where)
    bad = [k for k, v in weights.items() if k in own and own[k].shape != v.shape]
    if bad:
        k = bad[0]
        raise CheckpointError(f"{where}: {len(bad)} tensor(s) have other shapes than the config's model, e.g. {k!r}: "
                              f"{tuple(weights[k].shape)} in the file, {tuple(own[k].shape)} in the model (wrong "
                              "config? pass the YAML the checkpoint was trained with)")
    result = model.load_state_dict(weights, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"{len(result.missing_keys)} missing key(s), e.g. {result.missing_keys[:5]}")
    if result.unexpected_keys:
        problems.append(f"{len(result.unexpected_keys)} unexpected key(s), e.g. {result.unexpected_keys[:5]}")
    if problems and strict:
        raise CheckpointError(f"{where} does not fit the model: " + "; ".join(problems) +
                              " (wrong config? pass the matching YAML, or strict=False to load anyway)")
    for p in problems:
        log.warning("%s: %s", where, p)


def _report_depth_model(extra: dict[str, torch.Tensor], where: str) -> None:
    """Warn that an SD 2 depth file's MiDaS depth estimator (``depth_model.*``) is not loaded: ldm builds the U-Net
    (whose 5th input channel is the depth map), the autoencoder and the text encoder, not the estimator."""
    n = sum(k.startswith(DEPTH_MODEL_PREFIX) for k in extra)
    if n:
        log.warning("%s: ignored %d keys of the MiDaS depth estimator (%s*): ldm has no depth estimator; the U-Net's "
                    "extra input channel is the depth map, to be computed with a separate model and given as concat "
                    "conditioning (diffusers: StableDiffusionDepth2ImgPipeline with a DPT depth_estimator)", where, n,
                    DEPTH_MODEL_PREFIX)


def fit_one_by_one(weights: dict[str, torch.Tensor], own: dict[str, torch.Tensor], where: str) -> dict:
    """A 1×1 convolution saved as a Linear weight (C_out, C_in) or the reverse (C_out, C_in, 1, 1), as files
    converted back from diffusers hold the autoencoder's attention and the U-Net's proj_in/proj_out: the same
    numbers, reshaped to the model's layout."""
    out, n = dict(weights), 0
    for k, v in weights.items():
        t = own.get(k)
        if t is not None and t.shape != v.shape and t.numel() == v.numel() and {t.ndim, v.ndim} == {2, 4} \
                and t.shape[:2] == v.shape[:2]:
            out[k], n = v.reshape(t.shape), n + 1
    if n:
        log.info("%s: %d 1x1-convolution/linear weight(s) reshaped to the model's layout", where, n)
    return out


def _take_scale_factor(model: torch.nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    """The ``scale_factor`` buffer that original LDM runs with ``scale_by_std: true`` save (the latent scale measured
    at their start, which their config's value does not hold) replaces the config's value, config included."""
    value = weights.get("scale_factor")
    if value is None or value.numel() != 1 or not hasattr(model, "first_stage_model"):
        return  # none, or not a latent scale of ours: left for the strict check to report
    del weights["scale_factor"]
    model.first_stage_model.scale_factor.fill_(float(value))
    config = getattr(model, "config", None)
    if config is not None and "model" in config:
        with open_dict(config):
            config.model.params.scale_factor = float(value)
    log.info("%s: latent scale_factor %.6g from the checkpoint (scale_by_std)", where, float(value))


def _check_schedule(model: torch.nn.Module, extra: dict[str, torch.Tensor], where: str) -> None:
    """A checkpoint's own schedule buffers must agree with the config's schedule (else the config is wrong)."""
    theirs = extra.get("alphas_cumprod")
    if theirs is None:
        return
    ours = model.alphas_cumprod.to(torch.float64).cpu()
    # a file saved in half precision rounds its buffers too: ᾱ ≈ 1 is off by up to eps/4 (2.4e-4 in fp16)
    tol = max(1e-4, torch.finfo(theirs.dtype).eps if theirs.is_floating_point() else 0.0)
    if theirs.shape != ours.shape or (theirs.double() - ours).abs().max() > tol:
        raise CheckpointError(f"{where}: its alphas_cumprod buffer differs from the config's schedule "
                              f"({model.schedule_args}); use the config the model was trained with")
    log.debug("%s: schedule buffers match (%s)", where, ", ".join(k for k in SCHEDULE_BUFFERS if k in extra))


def save(model: Any, path: str | Path, ema_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Save as safetensors in the original key layout, with the resolved config in the metadata; attached LoRA
    adapters are merged into the written weights (the model keeps them; :func:`ldm.lora.lora_state_dict` saves them
    on their own)."""
    from ldm.lora import merged_state_dict  # noqa: PLC0415

    from ldm.conditioning.embeddings import warn_not_written  # noqa: PLC0415

    sd = merged_state_dict(model) if isinstance(model, torch.nn.Module) else dict(model.state_dict())
    warn_not_written(model, "save", "load their files again with ldm.load(..., embeddings=...)")
    if ema_state:
        sd.update(ema_state)
    cfg = OmegaConf.to_container(model.config, resolve=True)
    from ldm import __version__  # noqa: PLC0415

    return save_safetensors(sd, path, {META_CONFIG: json.dumps(cfg), "ldm_version": __version__})


def load_component(path: str | Path, device: str | torch.device | None = None) -> torch.nn.Module:
    """A stage export of ours (autoencoder or CLIP ``model.safetensors``): build its ``model`` section from the
    config in the file's metadata and load the weights strictly."""
    sd, meta = read_state_dict(path)
    cfg = config_from_metadata(meta)
    if cfg is None or "model" not in cfg:
        raise CheckpointError(f"{path}: no embedded config; not a stage export of this project")
    module = instantiate(cfg["model"], f"{path}: model")
    result = module.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{path}: weights do not fit the embedded config (missing {result.missing_keys[:3]}, "
                              f"unexpected {result.unexpected_keys[:3]})")
    module.config = OmegaConf.create(cfg)
    return module.to(device).eval() if device is not None else module.eval()
