"""Config files: YAML through omegaconf, merged with ``key=value`` overrides from the command line.

The top level of a config is a fixed set of sections (:data:`SECTIONS`); an unknown section fails at load time
with the key and the file. Objects inside ``model`` are built through :mod:`ldm.registry`, whose constructors
reject unknown parameters by name. ``lightning`` (from the original SD training YAMLs) is accepted when a model loads
from such a file, and refused by a training run, which would not read it (:mod:`ldm.training.keys`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.registry import ConfigError

log = logging.getLogger(__name__)

SECTIONS = ("model", "data", "train", "trainer", "logging", "sample", "lightning", "seed", "name", "stages")
CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"


def find_config(name: str | Path) -> Path:
    """A path as given, or a name relative to the repository's ``configs/`` folder (``sd/v1-inference.yaml``)."""
    p = Path(name)
    for cand in (p, CONFIG_ROOT / p, CONFIG_ROOT / f"{p}.yaml"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"config file {str(name)!r} not found (also looked under {CONFIG_ROOT})")


def parse_overrides(overrides: Iterable[str]) -> DictConfig:
    """``["train.lr=1e-4", "trainer.devices=2"]`` -> a config to merge; a malformed item is named in the error."""
    items = list(overrides)
    for item in items:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        return OmegaConf.from_dotlist(items)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot parse overrides {items}: {e}") from e


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> DictConfig:
    """Read a YAML config, merge ``key=value`` overrides and check its sections.

    Overrides may only replace keys that exist, except under ``train``, ``data``, ``trainer`` and ``logging``
    where new keys are allowed (their consumers validate them).
    """
    file = find_config(path)
    try:
        cfg = OmegaConf.load(file)
    except (OmegaConfBaseException, OSError, ValueError) as e:
        raise ConfigError(f"{file}: cannot read YAML: {e}") from e
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{file}: top level must be a mapping, got {type(cfg).__name__}")
    check_sections(cfg, str(file))
    ov = parse_overrides(overrides)
    for key in _leaf_keys(ov):
        top = key.split(".")[0]
        absent = object()  # a key set to null in the file exists: overriding it is fine
        if top not in ("train", "data", "trainer", "logging", "sample", "seed", "name") and \
                OmegaConf.select(cfg, key, default=absent) is absent:
            raise ConfigError(f"override {key!r}: no such key in {file}")
    cfg = OmegaConf.merge(cfg, ov)
    check_sections(cfg, f"{file} (after overrides)")
    cfg._set_flag("allow_objects", False)
    OmegaConf.set_struct(cfg, False)
    log.info("loaded config %s with %d override(s)", file, len(list(_leaf_keys(ov))))
    return cfg


def check_sections(cfg: DictConfig, where: str) -> None:
    unknown = [k for k in cfg.keys() if k not in SECTIONS]
    if unknown:
        raise ConfigError(f"{where}: unknown top-level key(s) {unknown}; allowed: {', '.join(SECTIONS)}")


def to_yaml(cfg: DictConfig | dict) -> str:
    """The resolved config as YAML text (stored with checkpoints and runs)."""
    return OmegaConf.to_yaml(OmegaConf.create(cfg), resolve=True)


def from_yaml(text: str) -> DictConfig:
    cfg = OmegaConf.create(text)
    if not isinstance(cfg, DictConfig):
        raise ConfigError("embedded config is not a mapping")
    check_sections(cfg, "embedded config")
    return cfg


def _leaf_keys(cfg: DictConfig, prefix: str = "") -> Iterable[str]:
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, DictConfig):
            yield from _leaf_keys(v, key + ".")
        else:
            yield key
