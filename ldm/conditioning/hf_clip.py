"""Hugging Face ``CLIPTextModel`` ⇄ open_clip text-tower state-dict conversion (pure tensor code).

SD v1 checkpoints store OpenAI CLIP ViT-L/14's text tower in the Hugging Face layout (under
``cond_stage_model.transformer.``); the same weights in open_clip's layout are what our text encoder runs. The two
layouts differ only in names and in the attention input projection, which open_clip keeps fused::

    HF (keys relative to CLIPTextModel)                         open_clip (keys relative to open_clip.CLIP)
    text_model.embeddings.token_embedding.weight                token_embedding.weight
    text_model.embeddings.position_embedding.weight             positional_embedding
    text_model.embeddings.position_ids                          (dropped: a constant arange buffer)
    text_model.encoder.layers.N.self_attn.{q,k,v}_proj.weight   transformer.resblocks.N.attn.in_proj_weight  (cat dim 0)
    text_model.encoder.layers.N.self_attn.{q,k,v}_proj.bias     transformer.resblocks.N.attn.in_proj_bias
    text_model.encoder.layers.N.self_attn.out_proj.*            transformer.resblocks.N.attn.out_proj.*
    text_model.encoder.layers.N.layer_norm1.* / layer_norm2.*   transformer.resblocks.N.ln_1.* / ln_2.*
    text_model.encoder.layers.N.mlp.fc1.* / fc2.*               transformer.resblocks.N.mlp.c_fc.* / c_proj.*
    text_model.final_layer_norm.*                               ln_final.*
    text_projection.weight  (CLIPTextModelWithProjection, W)    text_projection  (Wᵀ, shape (width, embed_dim))

``text_projection`` and ``logit_scale``: the plain ``CLIPTextModel`` that SD v1 checkpoints hold has neither (the
pooled projection and the contrastive temperature do not touch the token-level context). Our decision:
``open_clip_to_hf`` drops ``logit_scale`` always and ``text_projection`` unless ``keep_projection=True``, in which case
it is written as ``text_projection.weight`` = Wᵀ, the key ``CLIPTextModelWithProjection`` uses; ``hf_to_open_clip``
maps ``text_projection.weight`` back when present and otherwise leaves both out, so a text encoder in the HF layout
simply has no ``text_projection``/``logit_scale`` parameters.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch

Tensor = torch.Tensor

# exact (non-layer) names, HF -> open_clip
_TOP_HF2OC = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_TOP_OC2HF = {v: k for k, v in _TOP_HF2OC.items()}

# per-layer sub-names (after "layers.N." / "resblocks.N."), HF -> open_clip; q/k/v handled separately
_LAYER_HF2OC = {
    "self_attn.out_proj.weight": "attn.out_proj.weight",
    "self_attn.out_proj.bias": "attn.out_proj.bias",
    "layer_norm1.weight": "ln_1.weight",
    "layer_norm1.bias": "ln_1.bias",
    "layer_norm2.weight": "ln_2.weight",
    "layer_norm2.bias": "ln_2.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight",
    "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight",
    "mlp.fc2.bias": "mlp.c_proj.bias",
}
_LAYER_OC2HF = {v: k for k, v in _LAYER_HF2OC.items()}

_HF_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)$")
_OC_LAYER = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_QKV = re.compile(r"^self_attn\.([qkv])_proj\.(weight|bias)$")

HF_DROPPED = ("text_model.embeddings.position_ids",)
_HF_TEXT_ROOTS = ("embeddings", "encoder", "final_layer_norm")  # CLIPTextModel's children in transformers >= 5
OC_DROPPED = ("logit_scale", "attn_mask")


def is_hf_text_key(key: str) -> bool:
    """Whether ``hf_to_open_clip`` knows ``key`` (a CLIPTextModel key, position_ids or text_projection.weight)."""
    if key.split(".", 1)[0] in _HF_TEXT_ROOTS:
        key = "text_model." + key
    if key in HF_DROPPED or key in _TOP_HF2OC or key == "text_projection.weight":
        return True
    m = _HF_LAYER.match(key)
    return bool(m) and (m.group(2) in _LAYER_HF2OC or bool(_QKV.match(m.group(2))))


def hf_to_open_clip(sd: Mapping[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """Convert a ``CLIPTextModel`` (or ``CLIPTextModelWithProjection``) state dict to open_clip text-tower keys.

    Args:
        sd: HF keys (``text_model.…``, optionally ``text_projection.weight``), without any outer prefix; the flat
            keys of transformers >= 5 (``embeddings.…``, ``encoder.…``, ``final_layer_norm.…``) are accepted too.
        num_layers: the number of transformer layers expected; every one of them must be complete.

    Returns:
        open_clip keys (``token_embedding.weight``, ``transformer.resblocks.N.attn.in_proj_weight``, …).
        ``position_ids`` is dropped. q/k/v (each (width, width) / (width,)) become ``in_proj`` ((3·width, width)).

    Raises:
        KeyError: naming an unrecognised key, a layer index ≥ num_layers, or a missing q/k/v part.
    """
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, value in sd.items():
        if key.split(".", 1)[0] in _HF_TEXT_ROOTS:
            key = "text_model." + key  # transformers >= 5 flattens CLIPTextModel (no text_model. level)
        if key in HF_DROPPED:
            continue
        if key in _TOP_HF2OC:
            out[_TOP_HF2OC[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()  # Linear W (embed, width) -> (width, embed)
        elif m := _HF_LAYER.match(key):
            n, sub = int(m.group(1)), m.group(2)
            if n >= num_layers:
                raise KeyError(f"hf_to_open_clip: {key!r} has layer index {n} but num_layers={num_layers}")
            if q := _QKV.match(sub):
                qkv.setdefault((n, q.group(2)), {})[q.group(1)] = value
            elif sub in _LAYER_HF2OC:
                out[f"transformer.resblocks.{n}.{_LAYER_HF2OC[sub]}"] = value
            else:
                raise KeyError(f"hf_to_open_clip: unrecognised CLIPTextModel key {key!r}")
        else:
            raise KeyError(f"hf_to_open_clip: unrecognised CLIPTextModel key {key!r}")
    for (n, kind), parts in sorted(qkv.items()):
        missing = [c for c in "qkv" if c not in parts]
        if missing:
            missing_key = f"text_model.encoder.layers.{n}.self_attn.{missing[0]}_proj.{kind}"
            raise KeyError(f"hf_to_open_clip: {missing_key} is missing")
        out[f"transformer.resblocks.{n}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    _check_layers(out, num_layers)
    return out


def _check_layers(out: Mapping[str, Tensor], num_layers: int) -> None:
    """Every layer 0..num_layers-1 must have all of its 12 tensors (an absent layer is a truncated checkpoint)."""
    for n in range(num_layers):
        for sub in ("attn.in_proj_weight", "attn.in_proj_bias", *_LAYER_OC2HF):
            if f"transformer.resblocks.{n}.{sub}" not in out:
                hf = _LAYER_OC2HF.get(sub, "self_attn.q_proj." + sub.rsplit("_", 1)[-1])
                raise KeyError(f"hf_to_open_clip: text_model.encoder.layers.{n}.{hf} is missing")


def open_clip_to_hf(sd: Mapping[str, Tensor], keep_projection: bool = False) -> dict[str, Tensor]:
    """Convert open_clip text-tower keys to Hugging Face ``CLIPTextModel`` keys.

    Args:
        sd: open_clip keys without outer prefix (``token_embedding.weight``, ``transformer.resblocks.N.…``,
            ``ln_final.…``, ``positional_embedding``, optionally ``text_projection``/``logit_scale``).
        keep_projection: write ``text_projection`` as ``text_projection.weight`` (= Wᵀ, the
            ``CLIPTextModelWithProjection`` key); by default it is dropped, like ``logit_scale`` always is.

    Returns:
        HF keys (``text_model.…``). ``in_proj`` (3·width, …) is split into q/k/v with independent storage (clones),
        so the result can be saved with safetensors. ``position_ids`` is not written (current transformers keeps it
        non-persistent).

    Raises:
        KeyError: naming an unrecognised key (a vision-tower key, for instance).
    """
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key in OC_DROPPED:
            continue
        if key in _TOP_OC2HF:
            out[_TOP_OC2HF[key]] = value
        elif key == "text_projection":
            if keep_projection:
                out["text_projection.weight"] = value.t().contiguous()
        elif m := _OC_LAYER.match(key):
            n, sub = int(m.group(1)), m.group(2)
            base = f"text_model.encoder.layers.{n}."
            if sub in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = sub.rsplit("_", 1)[-1]
                for c, part in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{base}self_attn.{c}_proj.{kind}"] = part.clone()
            elif sub in _LAYER_OC2HF:
                out[base + _LAYER_OC2HF[sub]] = value
            else:
                raise KeyError(f"open_clip_to_hf: unrecognised open_clip text key {key!r}")
        else:
            raise KeyError(f"open_clip_to_hf: unrecognised open_clip text key {key!r}")
    return out
