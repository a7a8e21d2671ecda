"""The keys of the ``train``, ``sample`` and ``logging`` sections: which stage reads each, and what values it takes.

Checked once, before anything is built (:func:`check_run_config`): a misspelt key, a key the chosen stage never
reads (``train.init_checkpoint`` for the CLIP stage would otherwise train from scratch without a word) or a value of
the wrong type or range fails with a :class:`ldm.registry.ConfigError` that names the key.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ldm.registry import ConfigError

Check = Callable[[Any], str | None]  # a value -> None when fine, else what was expected


def number(lo: float | None = None, hi: float | None = None, *, integer: bool = False, lo_open: bool = False,
         null: bool = False) -> Check:
    """A number (an int when ``integer``) in [lo, hi] ((lo, hi] with ``lo_open``); None allowed with ``null``."""
    kind = "an int" if integer else "a number"
    bounds = (f" > {lo}" if lo_open else f" ≥ {lo}") if lo is not None else ""
    bounds += f" and ≤ {hi}" if hi is not None else ""
    want = f"{kind}{bounds}" + (" or null" if null else "")

    def check(v: Any) -> str | None:
        if v is None:
            return None if null else want
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
            return want
        if not math.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
            return want
        return None
    return check


def _choice(*values: Any) -> Check:
    return lambda v: None if v in values else f"one of {', '.join(map(repr, values))}"


def boolean(null: bool = False) -> Check:
    return lambda v: None if isinstance(v, bool) or (null and v is None) else "true or false" + (" or null" * null)


def _str(null: bool = False) -> Check:
    return lambda v: None if isinstance(v, str) and v or (null and v is None) else "a string" + (" or null" * null)


def _mapping(keys: Mapping[str, Check] | None = None) -> Check:
    """A mapping; with ``keys``, only those keys, each checked."""
    def check(v: Any) -> str | None:
        if v is None:
            return None
        if not isinstance(v, Mapping):
            return "a mapping (key: value, …)"
        if keys is not None:
            for k, item in v.items():
                if k not in keys:
                    return f"a mapping with keys among {', '.join(sorted(keys))} (not {k!r})"
                bad = keys[k](item)
                if bad:
                    return f"{k} to be {bad}, got {item!r}"
        return None
    return check


def _betas(v: Any) -> str | None:
    ok = isinstance(v, (list, tuple)) and len(v) == 2 and all(number(0, 1)(b) is None and b < 1 for b in v)
    return None if ok else "two numbers in [0, 1), e.g. [0.9, 0.999]"


def _prompts(v: Any) -> str | None:
    ok = v is None or isinstance(v, str) or (isinstance(v, (list, tuple)) and v and all(isinstance(p, str) for p in v))
    return None if ok else "a list of prompts (strings)"


def _compile(v: Any) -> str | None:
    if isinstance(v, bool) or v is None:
        return None
    import torch._dynamo  # noqa: PLC0415

    names = torch._dynamo.list_backends(exclude_tags=())
    return None if v in names else f"true, false or a torch.compile backend ({', '.join(sorted(names))})"


def _compile_mode(v: Any) -> str | None:
    """null or one of torch.compile's modes (``torch._inductor.list_mode_options``), so that a misspelt mode fails
    here, naming the key, rather than at the first compile."""
    if v is None:
        return None
    from torch._inductor import list_mode_options  # noqa: PLC0415

    modes = list(list_mode_options())
    return None if v in modes else f"null or a torch.compile mode ({', '.join(modes)})"


POSITIVE_INT = number(1, integer=True)
LIST: Check = lambda v: None if v is None or isinstance(v, (list, tuple)) else "a list"  # noqa: E731


def _lora_targets(v: Any) -> str | None:
    """null (the attention projections) or a non-empty list of module names (an empty one would fall back to them)."""
    ok = v is None or (isinstance(v, (list, tuple)) and v and all(isinstance(t, str) and t for t in v))
    return None if ok else "null or a non-empty list of module names, e.g. [attn1.to_q, attn2.to_k]"


def _check_lora(lora: Mapping[str, Any] | None) -> None:
    """``train.lora.alpha``/``targets`` without a rank > 0 would train the whole U-Net with no adapter: an error."""
    if lora and not lora.get("rank") and any(lora.get(k) is not None for k in ("alpha", "targets")):
        given = ", ".join(f"train.lora.{k}" for k in ("alpha", "targets") if lora.get(k) is not None)
        raise ConfigError(f"{given} set but train.lora.rank is {lora.get('rank', 0)}: no LoRA would be trained (the "
                          "whole U-Net would be); set train.lora.rank > 0, or drop train.lora")


# train keys every stage reads
COMMON: dict[str, Check] = {
    "stage": _choice("diffusion", "autoencoder", "clip"), "lr": number(0, lo_open=True),
    "lr_scale": _choice("none", "linear"), "lr_base_batch": number(0, lo_open=True),
    "warmup_steps": number(0, integer=True),
    "weight_decay": number(0), "betas": _betas, "eps": number(0, lo_open=True), "grad_clip": number(0, null=True),
    "seed": number(0, integer=True), "check_finite": boolean(), "max_consecutive_nonfinite": POSITIVE_INT,
    "fused_optimizer": boolean(null=True), "dist_timeout_s": number(0, lo_open=True),
    "checkpoint": _mapping({"every_n_steps": POSITIVE_INT, "keep_last": number(-1, integer=True)}),
    "snapshot_every_min": number(0, lo_open=True, null=True), "val_every_n_steps": number(1, integer=True, null=True),
    "val_batches": POSITIVE_INT, "val_seed": number(0, integer=True),
}
STAGE_KEYS: dict[str, dict[str, Check]] = {
    "diffusion": {
        "init_checkpoint": _str(null=True), "init_use_ema": boolean(), "components": _mapping(),
        "gradient_checkpointing": boolean(null=True), "ema_decay": number(0, 1, null=True),
        "ema_every_n_steps": POSITIVE_INT,
        "lora": _mapping({"rank": number(0, integer=True), "alpha": number(0, lo_open=True, null=True),
                          "targets": _lora_targets}),
        "caption_dropout": number(0, 1), "min_snr_gamma": number(0, lo_open=True, null=True), "offset_noise": number(0),
        "scale_factor": _choice("auto", "config", None), "scale_batches": POSITIVE_INT, "latent_shift": boolean(),
        "channels_last": boolean(null=True), "compile": _compile, "compile_mode": _compile_mode,
        "debug_fail": _mapping({"rank": number(0, integer=True), "step": number(0, integer=True)}),
        "text_encoder_lr": number(0, lo_open=True, null=True),  # with model.params.cond_stage_trainable
        "textual_inversion": _mapping(),  # its keys: ldm.diffusion.inversion.inversion_settings
    },
    "autoencoder": {"loss": _mapping(), "disc_lr_mult": number(0),
                    "image_every_n_steps": number(0, integer=True, null=True),
                    "latent_std_batches": number(0, integer=True)},  # 0: no latent statistics at export
    "clip": {"local_loss": boolean()},
}
SAMPLE_KEYS: dict[str, Check] = {
    "every_n_steps": number(0, integer=True, null=True), "prompts": _prompts, "steps": POSITIVE_INT,
    "sampler": _str(), "guidance": number(), "seed": number(0, integer=True),
}
LOGGING_KEYS: dict[str, Check] = {
    "csv": boolean(), "tensorboard": boolean(), "progress_every_n_steps": POSITIVE_INT,
    "wandb": _mapping({"project": _str(), "name": _str(null=True), "mode": _choice("offline", "online", "disabled"),
                       "entity": _str(null=True), "tags": LIST}),
}


def check_section(section: str, values: Mapping[str, Any], allowed: Mapping[str, Check],
                   elsewhere: Mapping[str, str] | None = None) -> None:
    for key, value in values.items():
        if key not in allowed:
            if elsewhere and key in elsewhere:
                raise ConfigError(f"{section}.{key} is not read by the {elsewhere['']} stage (it belongs to the "
                                  f"{elsewhere[key]} stage): remove it, or it would be ignored")
            raise ConfigError(f"{section}.{key}: unknown key; allowed: {', '.join(sorted(allowed))}")
        bad = allowed[key](value)
        if bad:
            raise ConfigError(f"{section}.{key}: expected {bad}, got {value!r}")


# Keys of the original LatentDiffusion/DDPM configs (``model.params``) that steer the original's training and that
# the model accepts and ignores (ldm.model.IGNORED_LDM_PARAMS): the value the diffusion stage trains as, and what it
# does there. Another value would train differently from what the config says without a word, so it is refused.
UNREAD_TRAINING_PARAMS: dict[str, tuple[Any, str]] = {
    "loss_type": ("l2", "the L2 loss (min-SNR weighting: train.min_snr_gamma)"),
    "l_simple_weight": (1.0, "the simple loss at weight 1"),
    "original_elbo_weight": (0.0, "no variational-bound term"),
    "learn_logvar": (False, "no learned per-timestep log-variance"),
    "unet_trainable": (True, "the whole U-Net (or LoRA adapters: train.lora)"),
    "first_stage_trainable": (False, "a frozen autoencoder (train it with train.stage: autoencoder)"),
}


def _check_model_training_params(cfg: DictConfig, train: Mapping[str, Any]) -> None:
    """``model.params`` keys of the original's training that the diffusion stage would not honour (see
    :data:`UNREAD_TRAINING_PARAMS`), and the ones it does through ``train.*`` keys: ``ucg_training`` (caption
    dropout), ``scale_by_std`` (the measured latent scale), ``use_ema`` (an EMA)."""
    params = ((cfg.get("model") or {}).get("params")) or {}
    for key, (value, does) in UNREAD_TRAINING_PARAMS.items():
        if key in params and params[key] != value:
            raise ConfigError(f"model.params.{key}: {params[key]!r} is not read by the diffusion stage, which trains "
                              f"with {does} ({key}: {value!r}); set it so, or remove it")
    if params.get("ucg_training"):
        raise ConfigError(f"model.params.ucg_training ({params['ucg_training']}) is not read: the diffusion stage "
                          "drops captions with train.caption_dropout (e.g. 0.1); set that and remove ucg_training")
    if params.get("scale_by_std") and train.get("scale_factor") != "auto":
        raise ConfigError("model.params.scale_by_std: true, but the latent scale is measured only with "
                          "train.scale_factor: auto; set that (or scale_by_std: false to keep the config's "
                          "scale_factor)")
    if params.get("use_ema") is True and not train.get("ema_decay"):
        raise ConfigError("model.params.use_ema: true, but the diffusion stage keeps an EMA only with "
                          "train.ema_decay (the original's LitEma: 0.9999); set it, or use_ema: false")


def _check_no_lightning_section(cfg: DictConfig) -> None:
    """The original training YAMLs' ``lightning`` section (Trainer options, callbacks) is accepted when a model loads
    from one, but a training run would not read it: refused, with where each part goes."""
    section = cfg.get("lightning")
    if not section:
        return
    parts = ", ".join(f"lightning.{k}" for k in section)
    raise ConfigError(f"{parts}: the original training YAML's lightning section is not read by ldm-train; Trainer "
                      "options go in trainer (lightning.trainer.max_steps -> trainer.max_steps), checkpointing in "
                      "train.checkpoint, the image logger in sample.every_n_steps; move them and remove the section")


def check_run_config(cfg: DictConfig) -> None:
    """Check the ``train``, ``sample`` and ``logging`` sections of a training config (see the module docstring)."""
    _check_no_lightning_section(cfg)
    section = cfg.get("train")
    if section is None:
        raise ConfigError("the config has no train section (train.stage: diffusion, autoencoder or clip)")
    train = OmegaConf.to_container(section, resolve=True)
    stage = train.get("stage", "diffusion")
    bad = COMMON["stage"](stage)
    if bad:
        raise ConfigError(f"train.stage: expected {bad}, got {stage!r}")
    others = {k: s for s, keys in STAGE_KEYS.items() if s != stage for k in keys}
    check_section("train", train, {**COMMON, **STAGE_KEYS[stage]}, {**others, "": stage})
    if stage == "diffusion":
        _check_lora(train.get("lora"))
        _check_model_training_params(cfg, train)
    sample = OmegaConf.to_container(cfg.get("sample") or OmegaConf.create({}), resolve=True)
    check_section("sample", sample, SAMPLE_KEYS)
    if sample.get("every_n_steps") and stage != "diffusion":  # 0 or null: grids off, as in every stage
        raise ConfigError(f"sample.every_n_steps={sample['every_n_steps']} is not read by the {stage} stage (sample "
                          "grids are drawn by the diffusion stage only)")
    if sample.get("every_n_steps") and not sample.get("prompts"):
        raise ConfigError("sample.every_n_steps is set but sample.prompts is empty: give the prompts to sample")
    if int(train.get("ema_every_n_steps") or 1) > 1 and not train.get("ema_decay"):
        raise ConfigError(f"train.ema_every_n_steps is {train['ema_every_n_steps']} but train.ema_decay is not set: "
                          "no EMA is kept (set train.ema_decay, e.g. 0.9999, or drop ema_every_n_steps)")
    check_section("logging", OmegaConf.to_container(cfg.get("logging") or OmegaConf.create({}), resolve=True),
                   LOGGING_KEYS)


def wandb_on(logging_section: Mapping[str, Any]) -> bool:
    """Whether ``logging.wandb`` asks for a Weights & Biases logger (``mode: disabled`` turns it off)."""
    wb = logging_section.get("wandb")
    return bool(wb) and wb.get("mode", "offline") != "disabled"


def sample_prompts(sample: Mapping[str, Any]) -> list[str]:
    """``sample.prompts`` as a list (a single string is one prompt, not a list of characters)."""
    prompts = sample.get("prompts") or []
    return [prompts] if isinstance(prompts, str) else list(prompts)
