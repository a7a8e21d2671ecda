"""Textual inversion (Gal et al. 2022, "An Image is Worth One Word"): train only the vectors of a new word.

``train.textual_inversion: {name: "<my-style>", init_text: "emoji", num_vectors: 2, template: "{caption}, {name}"}``
in the diffusion stage adds ``name`` to the text encoder as ``num_vectors`` vectors (``ldm.conditioning.embeddings``),
initialised from the token embeddings of ``init_text`` as the web UI does (vector i is that of token
⌊i · tokens / num_vectors⌋; zeros without an init text; ``num_vectors`` defaults to the init text's token count), and
trains them alone: the U-Net, the autoencoder and the rest of the text encoder stay frozen, and the loss is the
diffusion loss as for fine-tuning. ``template`` (default ``"{caption}"``) builds each training caption from the
data's; a batch none of whose captions holds the name would train nothing and stops the run with an error.

The export writes the base model unchanged (``model.safetensors``) and the vectors beside it twice: in the web UIs'
layout (``embedding.safetensors``: ``emb_params`` (n, D), the name in its metadata) and in diffusers' (``learned_
embeds.safetensors``: ``{name: (n, D)}``), which ``ldm.load(..., embeddings=[path])``, ``scripts/sample.py
--embedding`` and diffusers' ``load_textual_inversion`` read.

Refused, naming the key: with ``train.lora``, ``model.params.cond_stage_trainable`` or ``train.ema_decay`` (nothing
of the U-Net trains), an encoder that already holds embeddings, a template with fields other than ``{caption}`` and
``{name}``, and a latent cache holding token states (made without the new word).
"""
from __future__ import annotations

import logging
import string
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf

from ldm.diffusion.joint_text import lora_on, refuse_token_state_caches, text_encoder_trainable
from ldm.registry import ConfigError

log = logging.getLogger(__name__)

KEY = "train.textual_inversion"
FIELDS = {"name", "init_text", "num_vectors", "template"}


def inversion_settings(config: DictConfig) -> dict[str, Any] | None:
    """``train.textual_inversion`` checked (see the module docstring), or None when it is not set."""
    section = (config.get("train") or {}).get("textual_inversion")
    if not section:
        return None
    ti = OmegaConf.to_container(section, resolve=True) if OmegaConf.is_config(section) else dict(section)
    unknown = set(ti) - FIELDS
    if unknown:
        raise ConfigError(f"{KEY}: unknown key(s) {sorted(unknown)}; allowed: {sorted(FIELDS)}")
    name = ti.get("name")
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise ConfigError(f"{KEY}.name: expected a word to use in captions and prompts, e.g. '<my-style>', "
                          f"got {name!r}")
    n = ti.get("num_vectors")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"{KEY}.num_vectors: expected a positive int or null, got {n!r}")
    template = ti.get("template") or "{caption}"
    fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    if fields - {"name", "caption"}:
        raise ConfigError(f"{KEY}.template: {template!r} holds fields other than {{name}} and {{caption}}: "
                          f"{sorted(fields - {'name', 'caption'})}")
    check_alone(config)
    return {"name": name, "init_text": str(ti.get("init_text") or ""), "num_vectors": n, "template": template}


def check_alone(config: DictConfig) -> None:
    """What cannot train beside textual inversion, or would train nothing (module docstring)."""
    t = config.train
    if lora_on(t):
        raise ConfigError(f"{KEY} with train.lora: textual inversion trains the new word's vectors alone")
    if text_encoder_trainable(config):
        raise ConfigError(f"{KEY} with model.params.cond_stage_trainable: true: textual inversion trains the new "
                          "word's vectors alone")
    if t.get("ema_decay"):
        raise ConfigError(f"{KEY} with train.ema_decay: the EMA averages the U-Net, which does not train here; set "
                          "train.ema_decay=null")
    refuse_token_state_caches(config, KEY, "made without the new word")


def initial_vectors(encoder: Any, init_text: str, num_vectors: int | None) -> torch.Tensor:
    """(n, D) start vectors from ``init_text``'s token embeddings (module docstring)."""
    ids = encoder._encode_text(init_text) if init_text else []
    emb = encoder.model.token_embedding.weight.detach()
    n = num_vectors or max(len(ids), 1)
    if not ids:
        return emb.new_zeros(n, emb.shape[1]).float()
    rows = [ids[i * len(ids) // n] for i in range(n)]
    return emb[rows].float().clone()


def add_trainable_word(encoder: Any, settings: Mapping[str, Any]) -> torch.nn.Parameter:
    """Add the new word to ``encoder`` and make its vectors the one trainable parameter of the encoder."""
    name = settings["name"]
    if getattr(encoder, "embeddings", None) is None:
        raise ConfigError(f"{KEY}: {type(encoder).__name__} takes no textual-inversion words")
    if encoder.embeddings:
        raise ConfigError(f"{KEY}: the text encoder already holds embeddings {sorted(encoder.embeddings)}; train one "
                          "word on an encoder without them")
    vectors = initial_vectors(encoder, settings["init_text"], settings["num_vectors"])
    encoder.add_embedding(name, vectors)
    encoder.requires_grad_(False)
    param = torch.nn.Parameter(encoder.extra_vectors.detach().clone())
    del encoder._buffers["extra_vectors"]
    encoder.register_parameter("extra_vectors", param)  # (n, D): the only trainable tensor
    log.info("%s: training %d vector(s) of width %d for %r, initialised from %r", KEY, vectors.shape[0],
             vectors.shape[1], name, settings["init_text"] or "zeros")
    return param


def captions(batch_captions: list[str], settings: Mapping[str, Any]) -> list[str]:
    """The training captions through the template; refuses a batch none of which names the word."""
    from ldm.conditioning.embeddings import split_prompt  # noqa: PLC0415

    out = [settings["template"].format(caption=c, name=settings["name"]) for c in batch_captions]
    if not any(len(split_prompt(c, [settings["name"]])) > 1 or c.lower() == settings["name"].lower() for c in out):
        raise ConfigError(f"{KEY}: no caption of the batch names {settings['name']!r} (e.g. {out[0]!r}), so nothing "
                          "would train; put it in the captions, or set train.textual_inversion.template, e.g. "
                          "'{caption}, {name}'")
    return out


def write_embedding(vectors: torch.Tensor, name: str, path: str | Path) -> list[Path]:
    """The vectors (n, D) beside the export ``path``: ``embedding.safetensors`` (the web UIs' ``emb_params``) and
    ``learned_embeds.safetensors`` (diffusers' ``{name: vectors}``); returns both paths."""
    from ldm.checkpoint import save_safetensors  # noqa: PLC0415

    v = vectors.detach().float().cpu().contiguous()
    webui, diffusers = Path(path).with_name("embedding.safetensors"), Path(path).with_name("learned_embeds.safetensors")
    save_safetensors({"emb_params": v}, webui, {"name": name})
    save_safetensors({name: v.clone()}, diffusers, {"name": name})
    return [webui, diffusers]


def strip_inversion(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict without the new word's vectors (the base model, which loads without the embedding)."""
    return {k: v for k, v in sd.items() if not k.endswith("cond_stage_model.extra_vectors")}
