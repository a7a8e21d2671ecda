"""Text encoder and tokenizer: our layouts ⇄ the transformers ``CLIPTextModel`` in a diffusers folder.

SD v1 (``cond_stage_model.transformer.text_model.*``) already has the transformers layout: the prefix is stripped.
SD v2 (``cond_stage_model.model.*``, open_clip) is renamed with :mod:`ldm.conditioning.hf_clip`, which matches what
diffusers' single-file loader does (``convert_open_clip_checkpoint``; tests/test_convert_diffusers.py checks it):
``resblocks.i`` → ``encoder.layers.i``, ``attn.in_proj_*`` split into ``self_attn.q/k/v_proj`` and so on.
Files are written with the ``text_model.`` prefix, which every transformers version reads (>= 5.6 strips it on
load). What the diffusers folder does not hold (documented loss):

* penultimate-layer conditioning (SD v2) never runs the last residual block, so it is dropped: SD 2.x's
  ``text_encoder`` has 23 layers, and ``CLIPTextModel``'s ``last_hidden_state`` (final LayerNorm over layer 23)
  equals our penultimate output;
* ``text_projection`` and ``logit_scale`` (contrastive-loss parts, unused for conditioning) are dropped.
On import these come back as zeros (they do not change any output of the model). The same drop applies to an
HF-layout (v1) encoder with ``layer="penultimate"`` ("CLIP skip"); such a folder imports as ``layer="last"`` with
one layer fewer, which computes the same context.

Tokenizer files (``vocab.json``, ``merges.txt``) are generated from open_clip's bundled BPE table, which is the
same vocabulary as OpenAI CLIP's; SD v1 pads with ``<|endoftext|>`` (49407) and SD v2 with ``!`` (id 0), as
diffusers' SD 2 repositories do. A quirk those repositories share: with ``!`` as a special (pad) token, transformers'
``CLIPTokenizer`` splits ``"!!"`` into two ``!`` tokens where open_clip (and our encoder) use the merged token.
"""
from __future__ import annotations

import gzip
import json
import logging
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from ldm.checkpoint import atomic_write
from ldm.conditioning.hf_clip import hf_to_open_clip, open_clip_to_hf

log = logging.getLogger(__name__)

HF_PREFIX = "text_model."
EOT_ID = 49407  # <|endoftext|>: SD v1 pads with it
# open_clip-layout keys that a diffusers folder does not hold; on import they are filled with zeros
_UNUSED_OPEN_CLIP = ("model.text_projection", "model.logit_scale")
_LAYER_RE = re.compile(r"(?:model\.transformer\.resblocks|transformer\.text_model\.encoder\.layers)\.(\d+)\.")


def text_encoder_to_hf(sd: Mapping[str, torch.Tensor], layout: str, num_layers: int,
                       layer: str) -> dict[str, torch.Tensor]:
    """Our text encoder's state dict (keys after ``cond_stage_model.``) → ``CLIPTextModel`` keys ``text_model.*``.

    ``layout`` "hf" (SD v1, ``transformer.text_model.*``) or "open_clip" (SD v2, ``model.*``). With
    ``layer="penultimate"`` the last layer (never run) is dropped, so ``CLIPTextModel.last_hidden_state`` equals our
    context. ``text_projection``, ``logit_scale`` and ``position_ids`` are dropped.
    """
    if layout == "hf":
        hf = {}
        for k, v in sd.items():
            if not k.startswith("transformer."):
                raise KeyError(f"text encoder (hf layout): unexpected key {k!r} (expected 'transformer.*')")
            if k.startswith(f"transformer.{HF_PREFIX}") and not k.endswith("position_ids"):
                hf[k[len("transformer."):]] = v
    elif layout == "open_clip":
        bad = [k for k in sd if not k.startswith("model.")]
        if bad:
            raise KeyError(f"text encoder (open_clip layout): unexpected key(s) {bad[:5]} (expected 'model.*')")
        hf = open_clip_to_hf({k[len("model."):]: v for k, v in sd.items() if not k.startswith("model.visual.")})
    else:
        raise ValueError(f"text encoder layout {layout!r} not in ('hf', 'open_clip')")
    if layer == "penultimate":
        last = f"{HF_PREFIX}encoder.layers.{num_layers - 1}."
        hf = {k: v for k, v in hf.items() if not k.startswith(last)}
    return hf


def text_encoder_from_hf(sd: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], layout: str,
                         layer: str) -> dict[str, torch.Tensor]:
    """``CLIPTextModel`` keys (with or without ``text_model.``) → our encoder's keys (after ``cond_stage_model.``).

    ``expected`` is our encoder's own state dict (names and shapes). The keys a diffusers folder cannot hold (see
    the module docstring) are filled with zeros; any other difference is left for the strict load to report.
    """
    hf = {(k if k.startswith(HF_PREFIX) else HF_PREFIX + k): v for k, v in sd.items()
          if not k.endswith("position_ids") and not k.startswith("text_projection")}
    n_given = len({m.group(1) for k in hf if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))})
    if layout == "hf":
        out = {"transformer." + k: v for k, v in hf.items()}
    else:
        out = {"model." + k: v for k, v in hf_to_open_clip(hf, n_given).items()}
    n_ours = len({m.group(1) for k in expected if (m := _LAYER_RE.match(k))})
    unused_layer = n_ours - 1 if layer == "penultimate" and n_given == n_ours - 1 else None
    filled = []
    for k, t in expected.items():
        m = _LAYER_RE.match(k)
        if k not in out and (k in _UNUSED_OPEN_CLIP or (m is not None and int(m.group(1)) == unused_layer)):
            out[k] = torch.zeros(t.shape, dtype=t.dtype)
            filled.append(k)
    if filled:
        log.info("text encoder: %d tensor(s) not in the diffusers folder (unused by %s-layer conditioning) "
                 "set to zeros, e.g. %s", len(filled), layer, filled[0])
    return out


def clip_text_config(hidden: int, intermediate: int, layers: int, heads: int, max_positions: int, vocab: int,
                     act: str, pad_token_id: int, eps: float = 1e-5, projection_dim: int = 768) -> dict[str, Any]:
    """A transformers ``CLIPTextConfig`` ``config.json`` dict."""
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "attention_dropout": 0.0,
            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": int(pad_token_id), "hidden_act": act,
            "hidden_size": int(hidden), "initializer_factor": 1.0, "initializer_range": 0.02,
            "intermediate_size": int(intermediate), "layer_norm_eps": float(eps),
            "max_position_embeddings": int(max_positions), "num_attention_heads": int(heads),
            "num_hidden_layers": int(layers), "projection_dim": int(projection_dim), "vocab_size": int(vocab),
            "torch_dtype": "float32"}


# ---------------------------------------------------------------------------------------------------- tokenizer
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte → printable-character table (every byte gets a visible stand-in)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_bpe() -> tuple[dict[str, int], list[str]]:
    """(vocab token → id, merges) of the CLIP tokenizer, built like open_clip's ``SimpleTokenizer``: 49408 ids."""
    import open_clip  # noqa: PLC0415  (only for the location of its bundled BPE file)

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    base = list(_bytes_to_unicode().values())
    tokens = base + [t + "</w>" for t in base] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer(folder: str | Path, pad_token: str, max_length: int = 77) -> None:
    """Write ``vocab.json``, ``merges.txt``, ``special_tokens_map.json``, ``tokenizer_config.json`` (atomically)."""
    folder = Path(folder)
    vocab, merges = clip_bpe()
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad_token}
    tok_cfg = {"tokenizer_class": "CLIPTokenizer", "model_max_length": int(max_length), "do_lower_case": True,
               "errors": "replace", "add_prefix_space": False, **special}
    _write_text(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    _write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    _write_text(folder / "special_tokens_map.json", json.dumps(special, indent=2))
    _write_text(folder / "tokenizer_config.json", json.dumps(tok_cfg, indent=2))


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# ---------------------------------------------------------------------------------------------------- configs
def text_config_to_hf(encoder: Any) -> dict[str, Any]:
    """Our ``OpenCLIPTextEncoder`` → the ``CLIPTextConfig`` dict of the ``CLIPTextModel`` it exports to."""
    m = encoder.model
    block = m.transformer.resblocks[0]
    quick = type(block.mlp.gelu).__name__ == "QuickGELU"
    proj = getattr(m, "text_projection", None)
    return clip_text_config(
        hidden=encoder.width, intermediate=block.mlp.c_fc.out_features,
        layers=encoder.num_layers - (1 if encoder.layer == "penultimate" else 0), heads=block.attn.num_heads,
        max_positions=m.positional_embedding.shape[0], vocab=m.token_embedding.num_embeddings,
        act="quick_gelu" if quick else "gelu", pad_token_id=encoder.pad_token, eps=float(m.ln_final.eps),
        projection_dim=int(proj.shape[1]) if isinstance(proj, torch.Tensor) else encoder.width)


_SD1_TEXT = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 hidden_act="quick_gelu", vocab_size=49408, max_position_embeddings=77)
_SD2_TEXT = dict(hidden_size=1024, num_hidden_layers=23, num_attention_heads=16, intermediate_size=4096,
                 hidden_act="gelu", vocab_size=49408, max_position_embeddings=77)


def text_encoder_yaml(cfg: Mapping[str, Any], pad_token_id: int | None = None,
                      where: str = "text_encoder/config.json") -> dict[str, Any]:
    """A ``CLIPTextConfig`` dict → our ``cond_stage_config`` (``{"target", "params"}``).

    QuickGELU (OpenAI CLIP, SD v1) → the HF layout, last layer, pad 49407; GELU (OpenCLIP, SD v2) → the open_clip
    layout, penultimate layer of ``num_hidden_layers + 1`` (the extra unused layer is zero), pad 0. The standard
    SD v1 / v2 sizes give the original YAML targets.
    """
    act = cfg.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise NotImplementedError(f"{where}: hidden_act={act!r} is not supported (quick_gelu or gelu)")
    v1 = act == "quick_gelu"
    pad = (EOT_ID if v1 else 0) if pad_token_id is None else int(pad_token_id)
    if all(cfg.get(k) == v for k, v in _SD1_TEXT.items()) and pad == EOT_ID:
        return {"target": "FrozenCLIPEmbedder"}
    if all(cfg.get(k) == v for k, v in _SD2_TEXT.items()) and pad == 0:
        return {"target": "FrozenOpenCLIPEmbedder", "params": {"freeze": True, "layer": "penultimate"}}
    width = int(cfg["hidden_size"])
    text_cfg = {"context_length": int(cfg.get("max_position_embeddings", 77)),
                "vocab_size": int(cfg.get("vocab_size", 49408)), "width": width,
                "heads": int(cfg["num_attention_heads"]), "layers": int(cfg["num_hidden_layers"]) + (0 if v1 else 1),
                "mlp_ratio": int(cfg["intermediate_size"]) / width}
    return {"target": "OpenCLIPTextEncoder",
            "params": {"arch": None, "text_cfg": text_cfg, "layer": "last" if v1 else "penultimate",
                       "layout": "hf" if v1 else "open_clip", "pad_token": pad, "quick_gelu": v1}}
