"""Whole models: our :class:`ldm.model.LatentDiffusion` ⇄ a diffusers ``StableDiffusionPipeline`` folder.

    model_index.json                      pipeline class and component classes (no safety checker)
    unet/config.json + diffusion_pytorch_model.safetensors
    vae/config.json + diffusion_pytorch_model.safetensors          (scaling_factor = our scale_factor)
    text_encoder/config.json + model.safetensors                   (transformers CLIPTextModel)
    tokenizer/vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json
    scheduler/scheduler_config.json                                (the discrete training schedule)

Only safetensors weights are read or written (never pickles). Every file is written atomically; an existing
``model_index.json`` is removed first and the new one written last, so an interrupted export is not a loadable folder
(never old and new components mixed). Weight files of an earlier save in the component folders (shards and their
index, variants, pickles), which diffusers would read instead of ours, are removed. diffusers is never imported here.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import OmegaConf

from ldm.checkpoint import CheckpointError, atomic_write, save_safetensors
from ldm.conditioning.embeddings import warn_not_written
from ldm.convert.diffusers_text import (EOT_ID, clip_bpe, text_config_to_hf, text_encoder_from_hf,
                                        text_encoder_to_hf, text_encoder_yaml, write_clip_tokenizer)
from ldm.convert.diffusers_unet import (DIFFUSERS_FORMAT_VERSION, unet_config_from_diffusers,
                                        unet_config_to_diffusers, unet_diffusers_to_ldm, unet_ldm_to_diffusers)
from ldm.convert.diffusers_vae import (vae_config_from_diffusers, vae_config_to_diffusers, vae_diffusers_to_ldm,
                                       vae_ldm_to_diffusers)
from ldm.lora import merged_state_dict

log = logging.getLogger(__name__)

PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": "cond_stage_model."}
WEIGHT_NAMES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
# our beta_schedule name -> diffusers' (LDM "linear" is diffusers "scaled_linear": linspace over sqrt(β))
BETA_TO_DIFFUSERS = {"linear": "scaled_linear", "scaled_linear": "scaled_linear", "linear_plain": "linear",
                     "sqrt_linear": "linear", "cosine": "squaredcos_cap_v2"}
BETA_FROM_DIFFUSERS = {"scaled_linear": "linear", "linear": "linear_plain", "squaredcos_cap_v2": "cosine"}
PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
DEPTH_PIPELINE = "StableDiffusionDepth2ImgPipeline"


# ------------------------------------------------------------------------------------------------------ export
def _split(sd: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in PREFIXES}
    other = []
    for k, v in sd.items():
        name = next((n for n, p in PREFIXES.items() if k.startswith(p)), None)
        if name is None:
            other.append(k)
        else:
            parts[name][k[len(PREFIXES[name]):]] = v
    if other:
        raise KeyError(f"export_diffusers: {len(other)} model key(s) belong to no U-Net/VAE/text encoder, e.g. "
                       f"{other[:5]} (a diffusers folder cannot hold them)")
    return parts


def scheduler_config(params: Mapping[str, Any]) -> dict[str, Any]:
    """The LatentDiffusion params' discrete schedule as a diffusers ``DDIMScheduler`` config."""
    kind = params.get("beta_schedule", "linear")
    if kind not in BETA_TO_DIFFUSERS:
        raise NotImplementedError(f"model.params.beta_schedule={kind!r} has no diffusers equivalent")
    zero_snr = bool(params.get("zero_terminal_snr", False))
    return {"_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
            "beta_start": float(params.get("linear_start", 0.00085)),
            "beta_end": float(params.get("linear_end", 0.012)), "beta_schedule": BETA_TO_DIFFUSERS[kind],
            "num_train_timesteps": int(params.get("timesteps", 1000)),
            "prediction_type": PREDICTION[params.get("parameterization", "eps")], "steps_offset": 1,
            "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True, "trained_betas": None,
            "rescale_betas_zero_snr": zero_snr, "timestep_spacing": "trailing" if zero_snr else "leading"}


def _write_json(path: Path, obj: Mapping[str, Any]) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _stat(buffer: torch.Tensor, params: Mapping[str, Any], key: str, default: float) -> float:
    """A latent statistic: the VAE's buffer (what the model uses), written as the config's value where that rounds
    to the buffer (0.18215, not float32's 0.18215000629), or the config's value for a meta-device model."""
    given = float(params.get(key, default))
    if buffer.is_meta or torch.tensor(given, dtype=buffer.dtype) == buffer:
        return given
    return float(buffer)


def diffusers_configs(model: Any, sample_size: int | None = None) -> dict[str, dict[str, Any]]:
    """The JSON files of the diffusers folder for ``model``, by path (``unet/config.json`` … ``model_index.json``)."""
    cfg = OmegaConf.to_container(model.config, resolve=True)
    params = cfg["model"]["params"]
    unet_params = params["unet_config"]["params"]
    vae_params = params["first_stage_config"]["params"]
    vae, enc = model.first_stage_model, model.cond_stage_model
    latent = int(sample_size if sample_size is not None else params.get("image_size", 64))
    pipeline = pipeline_class(unet_params)
    return {
        "unet/config.json": unet_config_to_diffusers(unet_params, sample_size=latent),
        "vae/config.json": vae_config_to_diffusers(vae_params["ddconfig"], vae_params["embed_dim"],
                                                   scaling_factor=_stat(vae.scale_factor, params, "scale_factor", 1.0),
                                                   shift_factor=_stat(vae.shift_factor, params, "shift_factor", 0.0),
                                                   sample_size=latent * vae.downsample_factor),
        "text_encoder/config.json": text_config_to_hf(enc),
        "scheduler/scheduler_config.json": scheduler_config(params),
        "model_index.json": model_index(pipeline),
    }


def pipeline_class(unet_params: Mapping[str, Any]) -> str:
    """The diffusers pipeline that runs a U-Net with these params, from its input channels (C latent channels out):
    C text-to-image, 2C + 1 inpainting (latents, mask, masked-image latents), C + 1 depth (latents, depth map)."""
    c_in, c = int(unet_params["in_channels"]), int(unet_params.get("out_channels", unet_params["in_channels"]))
    classes = {c: "StableDiffusionPipeline", 2 * c + 1: "StableDiffusionInpaintPipeline",
               c + 1: DEPTH_PIPELINE}
    if c_in not in classes:
        raise NotImplementedError(f"unet params: in_channels={c_in} with out_channels={c} fits no diffusers Stable "
                                  f"Diffusion pipeline (text-to-image {c}, depth {c + 1}, inpainting {2 * c + 1})")
    return classes[c_in]


def model_index(pipeline: str) -> dict[str, Any]:
    """``model_index.json`` of ``pipeline``. The depth pipeline's DPT ``depth_estimator`` and ``feature_extractor``
    are not written (null): ldm has no depth estimator (see :func:`export_diffusers`)."""
    index: dict[str, Any] = {
        "_class_name": pipeline, "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
        "feature_extractor": [None, None], "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    if pipeline == DEPTH_PIPELINE:
        index["depth_estimator"] = [None, None]
    else:
        index.update(safety_checker=[None, None], requires_safety_checker=False)
    return index


def _warn_depth_estimator(out: Path) -> None:
    log.warning("%s: a depth-conditioned model, exported as %s without its depth estimator (ldm has none; an "
                "original 512-depth-ema file's MiDaS depth_model.* is not converted). Load it with "
                "%s.from_pretrained(folder, depth_estimator=..., feature_extractor=...): a DPTForDepthEstimation and "
                "DPTImageProcessor, e.g. those of stabilityai/stable-diffusion-2-depth; or with depth_estimator=None, "
                "feature_extractor=None and a depth_map= for every call", out, DEPTH_PIPELINE, DEPTH_PIPELINE)


def _unpublish(out: Path) -> None:
    """Remove an earlier export's ``model_index.json``: until the new one is written (last), the folder does not load,
    so an export that fails half-way cannot leave a loadable mix of old and new components."""
    index = out / "model_index.json"
    if index.is_file():
        index.unlink()
        log.info("%s: removed the earlier model_index.json; the folder loads again once the export completes", out)


# files of an earlier save_pretrained that loaders read instead of (or beside) ours: sharded weights and their
# index (diffusers prefers an index to the single file), variants ("fp16"), pickles, flax/tf weights
_TOKENIZER_STALE = ("tokenizer.json", "added_tokens.json")
_WEIGHT_FILE = r"(pytorch_|flax_|tf_)?{stem}([.-][^/]*)?\.(safetensors|bin|msgpack|h5|ckpt)(\.index\.json)?"


def _stale_weights(folder: Path, stem: str) -> list[Path]:
    pattern = re.compile(_WEIGHT_FILE.format(stem=re.escape(stem)))
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name != f"{stem}.safetensors"
                  and pattern.fullmatch(p.name))


def _remove_stale(folder: Path, stem: str | None) -> None:
    """Remove the weight files (``stem``) or tokenizer files (None) of an earlier save from a component folder."""
    stale = _stale_weights(folder, stem) if stem else [folder / n for n in _TOKENIZER_STALE if (folder / n).is_file()]
    for p in stale:
        p.unlink()
    if stale:
        log.warning("%s: removed %d file(s) of an earlier save that loaders would read instead of the export: %s",
                    folder, len(stale), ", ".join(p.name for p in stale[:5]))


def export_diffusers(model: Any, out_dir: str | Path, sample_size: int | None = None) -> Path:
    """Write ``model`` (a :class:`ldm.model.LatentDiffusion` with ``.config``) as a diffusers pipeline folder.

    Args:
        model: our model; its weights (in whatever dtype they are) and config are exported.
        out_dir: the folder to create or overwrite (files are replaced atomically).
        sample_size: default latent size written to ``unet/config.json`` (else ``model.params.image_size``).
    Returns:
        ``out_dir`` as a Path. Loadable with ``StableDiffusionPipeline.from_pretrained(out_dir)`` (the inpainting
        and depth pipelines for 9- and 5-channel U-Nets; the depth pipeline's estimator is not written, a warning
        says how to load it).
    """
    out = Path(out_dir)
    configs = diffusers_configs(model, sample_size)  # first: fails early on what diffusers cannot express
    params = model.config.model.params
    enc = model.cond_stage_model
    parts = _split(merged_state_dict(model, "export_diffusers"))
    weights = {"unet": unet_ldm_to_diffusers(parts["unet"], params.unet_config.params),
               "vae": vae_ldm_to_diffusers(parts["vae"], params.first_stage_config.params.ddconfig),
               "text_encoder": text_encoder_to_hf(parts["text_encoder"], enc.layout, enc.num_layers, enc.layer)}
    _unpublish(out)
    for name, sd in weights.items():
        save_safetensors(sd, out / name / f"{WEIGHT_NAMES[name]}.safetensors", {"format": "pt"})
        _remove_stale(out / name, WEIGHT_NAMES[name])
    warn_not_written(model, "export_diffusers", "pass their files to diffusers' load_textual_inversion")
    vocab, _ = clip_bpe()
    pad = {i: t for t, i in vocab.items()}[enc.pad_token]
    write_clip_tokenizer(out / "tokenizer", pad_token=pad, max_length=enc.max_length)
    _remove_stale(out / "tokenizer", None)
    for rel, obj in configs.items():  # model_index.json last: an interrupted export is not a loadable folder
        _write_json(out / rel, obj)
    pipeline = configs["model_index.json"]["_class_name"]
    if pipeline == DEPTH_PIPELINE:
        _warn_depth_estimator(out)
    log.info("exported a diffusers %s folder to %s", pipeline, out)
    return out


# ------------------------------------------------------------------------------------------------------ import
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"diffusers folder: {str(path)!r} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file  # noqa: PLC0415

    if not path.is_file():
        raise FileNotFoundError(f"diffusers folder: {str(path)!r} does not exist")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from e


def _read_weights(folder: Path, stem: str, variant: str | None) -> tuple[dict[str, torch.Tensor], str]:
    """(tensors, the file they came from) of ``stem[.variant].safetensors`` or its sharded
    ``….safetensors.index.json`` (pickled .bin files are refused)."""
    names = [f"{stem}.{variant}" if variant else stem] + ([] if variant else [f"{stem}.fp16"])
    for name in names:
        single, index = folder / f"{name}.safetensors", folder / f"{name}.safetensors.index.json"
        if single.is_file():
            return _load_safetensors(single), str(single)
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map' of tensor names to shard files")
            sd: dict[str, torch.Tensor] = {}
            for f in sorted(set(weight_map.values())):
                sd.update(_load_safetensors(folder / f))
            return sd, str(index)
    pickles = sorted(p.name for p in folder.glob("*.bin"))
    hint = f" (found only pickled {pickles}; convert them to safetensors first)" if pickles else ""
    raise FileNotFoundError(f"diffusers folder: no {names[0]}.safetensors in {str(folder)!r}{hint}")


def _pad_token_id(tok_dir: Path) -> int | None:
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = tok_dir / name
        if path.is_file():
            pad = _read_json(path).get("pad_token")
            pad = pad.get("content") if isinstance(pad, dict) else pad
            if pad is not None:
                vocab_file = tok_dir / "vocab.json"
                vocab = _read_json(vocab_file) if vocab_file.is_file() else clip_bpe()[0]
                if pad not in vocab:
                    raise CheckpointError(f"{path}: pad_token {pad!r} is not in the vocabulary")
                return int(vocab[pad])
    return None


IMPORTED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
NOT_GENERATION = ("safety_checker", "feature_extractor")  # the output filter and its preprocessor: not the model's


def _warn_not_imported(folder: Path, index: Mapping[str, Any]) -> None:
    """Warn about the components of ``model_index.json`` that the import leaves out, such as the depth pipeline's
    ``depth_estimator`` (the safety checker and its feature extractor are left out without a word)."""
    left = sorted(k for k, v in index.items() if not k.startswith("_") and k not in IMPORTED + NOT_GENERATION
                  and isinstance(v, list) and v and v[0] is not None)
    if not left:
        return
    hint = (" (the depth model: ldm has none; its U-Net takes the depth map as an extra input channel, and an "
            "export writes the folder without it)" if "depth_estimator" in left else "")
    log.warning("%s: %s component(s) %s not imported%s", folder, index.get("_class_name", "pipeline"),
                ", ".join(left), hint)


def config_from_diffusers(folder: str | Path) -> dict[str, Any]:
    """Our config dict (the structure of ``configs/sd/v1-inference.yaml``) for a diffusers SD pipeline folder."""
    folder = Path(folder)
    if folder.is_file():
        raise NotADirectoryError(f"{str(folder)!r} is a file, not a diffusers pipeline folder (a single-file "
                                 "checkpoint loads with ldm.load)")
    index = _read_json(folder / "model_index.json")
    for part in ("unet", "vae", "text_encoder", "scheduler"):
        if not index.get(part) or index[part][0] is None:
            raise CheckpointError(f"{folder / 'model_index.json'}: no {part!r} component")
    _warn_not_imported(folder, index)
    unet = unet_config_from_diffusers(_read_json(folder / "unet" / "config.json"), str(folder / "unet/config.json"))
    vae = vae_config_from_diffusers(_read_json(folder / "vae" / "config.json"), str(folder / "vae/config.json"))
    sched_path = folder / "scheduler" / "scheduler_config.json"
    sched = _read_json(sched_path)
    kind = sched.get("beta_schedule", "linear")
    if kind not in BETA_FROM_DIFFUSERS or sched.get("trained_betas") is not None:
        raise NotImplementedError(f"{sched_path}: beta_schedule={kind!r} (or trained_betas) is not supported")
    prediction = {v: k for k, v in PREDICTION.items()}.get(sched.get("prediction_type", "epsilon"))
    if prediction is None:
        raise NotImplementedError(f"{sched_path}: prediction_type={sched['prediction_type']!r} is not supported")
    pad = _pad_token_id(folder / "tokenizer") if (folder / "tokenizer").is_dir() else None
    text = text_encoder_yaml(_read_json(folder / "text_encoder" / "config.json"), pad,
                             str(folder / "text_encoder/config.json"))
    hybrid = unet["in_channels"] != vae["embed_dim"]
    params = {
        "linear_start": float(sched.get("beta_start", 0.0001)), "linear_end": float(sched.get("beta_end", 0.02)),
        "timesteps": int(sched.get("num_train_timesteps", 1000)), "beta_schedule": BETA_FROM_DIFFUSERS[kind],
        "zero_terminal_snr": bool(sched.get("rescale_betas_zero_snr", False)), "parameterization": prediction,
        "image_size": unet["image_size"], "channels": vae["embed_dim"],
        "conditioning_key": "hybrid" if hybrid else "crossattn",
        "scale_factor": vae["scale_factor"], "shift_factor": vae["shift_factor"],
        "unet_config": {"target": "UNetModel", "params": unet},
        "first_stage_config": {"target": "AutoencoderKL",
                               "params": {"embed_dim": vae["embed_dim"], "ddconfig": vae["ddconfig"],
                                          "lossconfig": {"target": "Identity"}}},
        "cond_stage_config": text,
    }
    return {"model": {"target": "LatentDiffusion", "params": params}}


def import_diffusers(folder: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                     variant: str | None = None, strict: bool = True) -> Any:
    """Build our model from a diffusers Stable Diffusion folder (ours or ``StableDiffusionPipeline.save_pretrained``).

    Args:
        folder: the pipeline folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``scheduler/``,
            optionally ``tokenizer/`` for the pad token).
        device, dtype: where and in what precision the model lives (default: CPU, float32).
        variant: weights variant such as "fp16" (``diffusion_pytorch_model.fp16.safetensors``).
        strict: every weight of our model must come from the folder (besides the documented unused
            text-encoder tensors, see :mod:`ldm.convert.diffusers_text`).
    Returns:
        :class:`ldm.model.LatentDiffusion` in eval mode, with ``.config``.
    """
    from ldm.loading import build, load_weights  # noqa: PLC0415  (ldm.loading imports the whole model)

    folder = Path(folder)
    cfg = OmegaConf.create(config_from_diffusers(folder))
    model = build(cfg, str(folder))
    params = cfg.model.params
    enc = model.cond_stage_model
    convert = {"unet": lambda w: unet_diffusers_to_ldm(w, params.unet_config.params),
               "vae": lambda w: vae_diffusers_to_ldm(w, params.first_stage_config.params.ddconfig),
               "text_encoder": lambda w: text_encoder_from_hf(w, enc.state_dict(), enc.layout, enc.layer)}
    sd: dict[str, torch.Tensor] = {}
    for name, fn in convert.items():
        weights, where = _read_weights(folder / name, WEIGHT_NAMES[name], variant)
        try:
            part = fn(weights)
        except KeyError as e:  # keys that fit no block of the config's architecture: name the file
            raise KeyError(f"{where}: {e.args[0]}") from None
        sd.update({PREFIXES[name] + k: v for k, v in part.items()})
    load_weights(model, sd, strict=strict, where=str(folder))
    model.eval()
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
        model.alphas_cumprod = model.alphas_cumprod.double()  # σ arithmetic stays in float64
    log.info("imported diffusers folder %s (pad token %s)", folder, enc.pad_token if enc.pad_token != EOT_ID else "eot")
    return model
