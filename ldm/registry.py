"""The allowlist of objects a config may build.

A config names what to build with ``target:`` (a short name such as ``UNetModel``, or one of the original LDM
dotted paths so that the Stable Diffusion inference YAMLs load unchanged) and passes ``params:``. Nothing outside
:data:`REGISTRY` can be built: a config can never import or call arbitrary code.
"""
from __future__ import annotations

import importlib
import inspect
import logging
from typing import Any, Callable, Mapping

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config names something unknown, misses a key, or has a key nothing accepts."""


# short name -> "module:attribute" (imported lazily, so the registry costs nothing at start-up)
REGISTRY: dict[str, str] = {
    "LatentDiffusion": "ldm.model:LatentDiffusion",
    "UNetModel": "ldm.unet.model:UNetModel",
    "AutoencoderKL": "ldm.autoencoder.model:AutoencoderKL",
    "OpenCLIPTextEncoder": "ldm.conditioning.text_encoder:OpenCLIPTextEncoder",
    "FrozenCLIPEmbedder": "ldm.conditioning.text_encoder:frozen_clip_embedder",
    "FrozenOpenCLIPEmbedder": "ldm.conditioning.text_encoder:frozen_open_clip_embedder",
    "HFTextEncoder": "ldm.conditioning.hf_encoder:HFTextEncoder",
    "LambdaLinearScheduler": "ldm.lr_schedule:LambdaLinearScheduler",
    "LPIPSWithDiscriminator": "ldm.autoencoder.losses:LPIPSWithDiscriminator",
    "Identity": "torch.nn:Identity",
}

# The original CompVis / Stability-AI class paths found in released SD YAMLs.
LDM_ALIASES: dict[str, str] = {
    "ldm.models.diffusion.ddpm.LatentDiffusion": "LatentDiffusion",
    "ldm.modules.diffusionmodules.openaimodel.UNetModel": "UNetModel",
    "ldm.models.autoencoder.AutoencoderKL": "AutoencoderKL",
    "ldm.modules.encoders.modules.FrozenCLIPEmbedder": "FrozenCLIPEmbedder",
    "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder": "FrozenOpenCLIPEmbedder",
    "ldm.lr_scheduler.LambdaLinearScheduler": "LambdaLinearScheduler",
    "ldm.modules.losses.LPIPSWithDiscriminator": "LPIPSWithDiscriminator",
    "torch.nn.Identity": "Identity",
}


def resolve(target: str, where: str = "config") -> Callable[..., Any]:
    """Map a ``target`` string to its allowlisted constructor, or raise :class:`ConfigError`."""
    name = LDM_ALIASES.get(target, target)
    if name not in REGISTRY:
        allowed = ", ".join(sorted(REGISTRY))
        raise ConfigError(f"{where}: target {target!r} is not allowed; allowed targets: {allowed} "
                          f"(or the original LDM paths {', '.join(sorted(LDM_ALIASES))})")
    module, attr = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), attr)


def check_params(fn: Callable[..., Any], params: Mapping[str, Any], where: str) -> None:
    """Fail with the offending key's name when ``fn`` does not accept a key of ``params``."""
    sig = inspect.signature(fn)
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return
    unknown = [k for k in params if k not in sig.parameters]
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} for "
                          f"{getattr(fn, '__qualname__', fn)}; accepted: {', '.join(sig.parameters)}")


def instantiate(cfg: Mapping[str, Any], where: str = "config", **extra: Any) -> Any:
    """Build the object described by ``{"target": ..., "params": {...}}`` (``extra`` adds keyword arguments)."""
    cfg = _plain(cfg)
    if not isinstance(cfg, dict) or "target" not in cfg:
        raise ConfigError(f"{where}: expected a mapping with a 'target' key, got {cfg!r}")
    # base_learning_rate sits beside target/params in the original SD YAMLs; our learning rate is train.lr
    unknown = set(cfg) - {"target", "params", "base_learning_rate"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)} beside 'target' and 'params'")
    fn = resolve(str(cfg["target"]), where)
    params = dict(cfg.get("params") or {}, **extra)
    check_params(fn, params, f"{where}.params")
    log.debug("building %s from %s", cfg["target"], where)
    return fn(**params)


def _plain(cfg: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf  # noqa: PLC0415
    except ImportError:  # pragma: no cover - omegaconf is a hard dependency
        return cfg
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg
