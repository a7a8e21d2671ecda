"""Text conditioning: CLIP text encoders (open_clip / Hugging Face layouts), a generic HF encoder, caption dropout.

Names are imported lazily so that ``import ldm.conditioning`` does not import open_clip or transformers.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "OpenCLIPTextEncoder": "ldm.conditioning.text_encoder",
    "frozen_clip_embedder": "ldm.conditioning.text_encoder",
    "frozen_open_clip_embedder": "ldm.conditioning.text_encoder",
    "HFTextEncoder": "ldm.conditioning.hf_encoder",
    "drop_captions": "ldm.conditioning.dropout",
    "hf_to_open_clip": "ldm.conditioning.hf_clip",
    "open_clip_to_hf": "ldm.conditioning.hf_clip",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ldm.conditioning' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
