"""Textual-inversion embeddings (Gal et al. 2022): named sequences of learned token vectors used in prompts.

Files: the web UIs' ``.pt`` (``{"string_to_param": {"*": (n, D)}, "name": …}``) and ``.safetensors``
(``{"emb_params": (n, D)}``), and diffusers' ``learned_embeds`` (``{"<token>": (D,) or (n, D)}``). The name used in
prompts is the one given, else diffusers' "<token>", else the file's stem (the web UIs' rule). In a prompt, each
occurrence of the name becomes its n vectors (case-insensitive, as CLIP lowercases text; a name that begins or ends
with a letter, digit or "_" matches only where none of those adjoins it, so "cat" does not fire inside "cats"); the
rest of the text is tokenized as usual.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from ldm.checkpoint import CheckpointError, load_pickle, read_state_dict

SDXL_KEYS = ("clip_l", "clip_g")

log = logging.getLogger(__name__)


def _vectors(obj: Mapping[str, Any], path: Path) -> tuple[torch.Tensor, str | None]:
    """(n, D) vectors and the name the file gives itself, if any."""
    if isinstance(obj.get("string_to_param"), Mapping):  # the web UIs' .pt
        params = list(obj["string_to_param"].values())
        if len(params) != 1:
            raise CheckpointError(f"{path}: expected one entry in string_to_param, got {len(params)}")
        return params[0].detach(), None  # its "name" field is not the trigger: the web UIs use the file's stem
    if "emb_params" in obj:
        return obj["emb_params"], None
    if any(k in obj for k in SDXL_KEYS):
        raise CheckpointError(f"{path}: an SDXL embedding (clip_l/clip_g); this model has one text encoder")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1:  # diffusers' learned_embeds: {"<token>": vectors}
        (token, v), = tensors.items()
        return v, token
    raise CheckpointError(f"{path}: not a textual-inversion embedding (keys {sorted(obj)[:5]})")


def read_embedding(path: str | Path, name: str | None = None) -> tuple[str, torch.Tensor]:
    """(name, vectors (n, D) in float32) from an embedding file; ``name`` overrides the file's stem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedding {str(path)!r} does not exist")
    obj = read_state_dict(path)[0] if path.suffix == ".safetensors" else load_pickle(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict, got {type(obj).__name__}")
    v, own = _vectors(obj, path)
    v = v.float().reshape(-1, v.shape[-1]) if v.ndim in (1, 2) else v
    if v.ndim != 2 or v.shape[0] == 0:
        raise CheckpointError(f"{path}: embedding vectors must be (n, D), got {tuple(v.shape)}")
    token = own if own and own.startswith("<") and own.endswith(">") else None  # diffusers' "<token>" keys
    name = name or token or path.stem  # given, diffusers' token, or the stem
    if not name.strip():
        raise ValueError(f"{path}: empty embedding name")
    return name, v


def split_prompt(text: str, names: list[str]) -> list[str]:
    """The prompt cut around every occurrence of the names (longest first): ["a photo of ", "<cat>", " toy"]."""
    if not names:
        return [text]
    word = re.compile(r"\w")
    alternatives = [(r"(?<!\w)" if word.match(n[:1]) else "") + re.escape(n) + (r"(?!\w)" if word.match(n[-1:]) else "")
                    for n in sorted(names, key=len, reverse=True)]
    return [p for p in re.split("(" + "|".join(alternatives) + ")", text, flags=re.IGNORECASE) if p]


def warn_not_written(model: Any, where: str, hint: str) -> None:
    """Log that ``model``'s textual-inversion embeddings (loaded from their own files) are not in what ``where``
    writes: the files keep the base vocabulary, so prompts that use them need the embedding files again."""
    names = sorted(getattr(getattr(model, "cond_stage_model", None), "embeddings", None) or {})
    if names:
        log.warning("%s: the textual-inversion embeddings %s are not written (%s)", where, ", ".join(names), hint)
