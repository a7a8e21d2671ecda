"""The CLIP text encoder: prompts -> token-level context c of shape (B, 77, D) for the U-Net's cross-attention.

This is the only file in the project that imports ``open_clip``. One module serves both Stable Diffusion versions
(Stability-AI/stablediffusion ``ldm/modules/encoders/modules.py``):

- SD v1 (``FrozenCLIPEmbedder``): OpenAI CLIP ViT-L/14, QuickGELU, context = last layer + final LayerNorm, padded with
  the end-of-text token 49407 (the HF tokenizer pads with eos), weights in the Hugging Face ``CLIPTextModel`` layout
  under ``cond_stage_model.transformer.`` -> ``layout="hf"`` (keys converted by :mod:`ldm.conditioning.hf_clip` in
  state-dict hooks, so checkpoints load strictly and export unchanged).
- SD v2 (``FrozenOpenCLIPEmbedder``): OpenCLIP ViT-H/14, GELU, context = output of the *penultimate* resblock +
  ln_final, padded with 0 (open_clip's tokenizer), keys under ``cond_stage_model.model.`` -> ``layout="open_clip"``.

Nothing is ever downloaded: architectures come from open_clip's bundled JSON configs, the BPE vocabulary is bundled
with open_clip, and weights come from the enclosing checkpoint or a local ``weights`` file.
"""
from __future__ import annotations

import copy
import functools
import logging
import os
import re
from typing import Any, Mapping

import open_clip
import regex  # open_clip's tokenizer's pattern module
import torch
from open_clip.tokenizer import SimpleTokenizer
from torch import nn

from ldm import checkpoint
from ldm.conditioning.hf_clip import hf_to_open_clip, is_hf_text_key, open_clip_to_hf

log = logging.getLogger(__name__)

IDS_CACHE_SIZE = 1 << 16  # prompts whose BPE ids a text encoder keeps (~60 MB of Python objects at 20 ids each)


class IdsCache:
    """prompt -> its BPE ids (a tuple), at most :data:`IDS_CACHE_SIZE` of them (emptied when full), for one state
    of the encoder's textual-inversion names."""

    def __init__(self, state: tuple) -> None:
        self.state, self.ids = state, {}

    def get(self, text: str) -> tuple[int, ...] | None:
        return self.ids.get(text)

    def put(self, text: str, ids: list[int]) -> tuple[int, ...]:
        if len(self.ids) >= IDS_CACHE_SIZE:
            self.ids.clear()
        self.ids[text] = tuple(ids)
        return self.ids[text]


LAYERS = {"last": 0, "penultimate": 1}  # layer name -> number of final resblocks skipped
LAYOUTS = ("open_clip", "hf")
EOT_TOKEN = 49407  # SD v1 pads with it; SD v2 pads with 0
# special-token names transformers' CLIPTokenizer (SD v1) reads in a prompt (open_clip's: <start_of_text>, …)
HF_SPECIAL = {"<|startoftext|>": 49406, "<|endoftext|>": EOT_TOKEN}
_HF_SPECIAL_SPLIT = re.compile("(" + "|".join(map(re.escape, HF_SPECIAL)) + ")")
# a placeholder vision tower, built and deleted at once when only the text tower is wanted (saves building ViT-H's
# 630 M vision parameters just to drop them, which is what the original's ``del model.visual`` did)
_TINY_VISION = {"layers": 1, "width": 8, "head_width": 8, "patch_size": 8, "image_size": 8}
# keys a weights file may hold that the text-only / HF-layout module does not need
_OPTIONAL = ("text_projection", "logit_scale", "logit_bias")


def _checked(prompts: list[str]) -> list[str]:
    """The prompts, each a str (a TypeError names the first that is not)."""
    for i, text in enumerate(prompts):
        if not isinstance(text, str):
            raise TypeError(f"prompts[{i}] must be a str, got {type(text).__name__}")
    return prompts


@functools.lru_cache(maxsize=1)
def bpe_tokenizer() -> SimpleTokenizer:
    """open_clip's CLIP BPE tokenizer from its bundled vocabulary (parsed once per process)."""
    return SimpleTokenizer()


@functools.lru_cache(maxsize=1)
def hf_bpe_tokenizer() -> SimpleTokenizer:
    """:func:`bpe_tokenizer` reading open_clip's special-token names ("<start_of_text>", "<end_of_text>") in a prompt
    as text, as transformers' CLIPTokenizer (SD 1's) does; that tokenizer's own names are :data:`HF_SPECIAL`."""
    tok = copy.copy(bpe_tokenizer())  # the vocabulary and the BPE cache shared
    specials = "<start_of_text>|<end_of_text>|"
    if not tok.pat.pattern.startswith(specials):
        raise RuntimeError(f"open_clip's tokenizer pattern has changed: {tok.pat.pattern!r}")
    tok.pat = regex.compile(tok.pat.pattern[len(specials):], tok.pat.flags)
    return tok


def _model_cfg(arch: str | None, text_cfg: Mapping | None, embed_dim: int | None,
               vision_cfg: Mapping | None) -> dict[str, Any]:
    """Merge a bundled open_clip config (``arch``) with explicit overrides."""
    cfg: dict[str, Any] = {"text_cfg": {}, "vision_cfg": {}}
    if arch is not None:
        base = open_clip.get_model_config(arch)
        if base is None:
            raise ValueError(f"arch {arch!r} is not one of open_clip's bundled model configs "
                             f"(e.g. ViT-L-14, ViT-H-14; see open_clip.list_models())")
        cfg.update({k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()})
    elif text_cfg is None:
        raise ValueError("OpenCLIPTextEncoder: give either arch or text_cfg")
    cfg["text_cfg"].update(dict(text_cfg or {}))
    cfg["vision_cfg"].update(dict(vision_cfg or {}))
    if embed_dim is not None:
        cfg["embed_dim"] = int(embed_dim)
    cfg.setdefault("embed_dim", int(cfg["text_cfg"].get("width", 512)))
    if "custom_text" in cfg or cfg["text_cfg"].get("hf_model_name"):
        raise ValueError(f"arch {arch!r}: open_clip towers with a custom/HF text model are not supported here")
    return cfg


def _build_clip(cfg: dict[str, Any], quick_gelu: bool, with_visual: bool) -> nn.Module:
    vision = cfg["vision_cfg"] if with_visual else _TINY_VISION
    model = open_clip.model.CLIP(cfg["embed_dim"], vision, cfg["text_cfg"], quick_gelu=quick_gelu)
    if not with_visual:
        del model.visual
    return model


def upload(tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Token ids to ``device``. From the host to a GPU without waiting for the GPU's queue: a blocking copy would
    synchronize the stream (once per prompt batch in training and sampling); the ids are fresh and never reused."""
    return tokens.to(device, non_blocking=tokens.device.type == "cpu" and torch.device(device).type == "cuda")


class OpenCLIPTextEncoder(nn.Module):
    """CLIP text transformer returning token-level hidden states (B, max_length, width).

    Args:
        arch: an open_clip bundled config name ("ViT-H-14", "ViT-L-14", …) or None with ``text_cfg``.
        text_cfg, embed_dim, vision_cfg: explicit open_clip config fields (override ``arch``'s).
        layer: "last" (after all resblocks) or "penultimate" (after all but the last); ln_final follows either.
        layout: "open_clip" (state-dict keys ``model.…``, SD v2) or "hf" (``transformer.text_model.…``, SD v1).
        pad_token: id written after end-of-text (0 for SD v2, 49407 for SD v1).
        max_length: tokens per prompt, ≤ the config's context_length.
        freeze: no gradients, and eval mode that ``train()`` cannot undo.
        quick_gelu: x·σ(1.702x) activations (OpenAI CLIP weights).
        weights: optional local .safetensors/.pt/.bin file in open_clip or HF CLIP layout.
        with_visual: keep the image tower (stage-0 contrastive training); open_clip layout only.
    """

    def __init__(self, arch: str | None = "ViT-H-14", text_cfg: dict | None = None, embed_dim: int | None = None,
                 vision_cfg: dict | None = None, layer: str = "penultimate", layout: str = "open_clip",
                 pad_token: int = 0, max_length: int = 77, freeze: bool = True, quick_gelu: bool = False,
                 weights: str | None = None, with_visual: bool = False) -> None:
        super().__init__()
        if layer not in LAYERS:
            raise ValueError(f"layer {layer!r} not in {tuple(LAYERS)}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r} not in {LAYOUTS}")
        if with_visual and layout != "open_clip":
            raise ValueError("with_visual=True needs layout='open_clip' (the HF text layout has no image tower)")
        cfg = _model_cfg(arch, text_cfg, embed_dim, vision_cfg)
        self.model = _build_clip(cfg, quick_gelu or bool(cfg.get("quick_gelu", False)), with_visual)
        context_length, vocab = self.model.context_length, self.model.vocab_size
        if not 2 <= max_length <= context_length:
            raise ValueError(f"max_length {max_length} must be in [2, context_length={context_length}]")
        if not 0 <= pad_token < vocab:
            raise ValueError(f"pad_token {pad_token} outside the vocabulary [0, {vocab})")
        if len(self.model.transformer.resblocks) <= LAYERS[layer]:
            raise ValueError(f"layer {layer!r} needs at least 2 resblocks")
        self.layer, self.layout, self.pad_token, self.max_length = layer, layout, pad_token, max_length
        self.with_visual, self.frozen = with_visual, freeze
        self.num_layers = len(self.model.transformer.resblocks)
        self.embeddings: dict[str, tuple[int, int]] = {}  # textual inversion: name -> (first id, n), add_embedding
        if layout == "hf":  # CLIPTextModel has neither (see hf_clip's docstring)
            self.model.text_projection = None
            del self.model.logit_scale
            self.register_state_dict_post_hook(_export_hf)
            self.register_load_state_dict_pre_hook(_import_hf)
        if weights is not None:
            self.load_weights(weights)
        if freeze:
            self.requires_grad_(False)
            self.eval()

    # -- properties ----------------------------------------------------------------------------------------
    @property
    def width(self) -> int:
        """Hidden size D of the returned context (768 for ViT-L/14, 1024 for ViT-H/14)."""
        return int(self.model.transformer.width)

    def train(self, mode: bool = True) -> "OpenCLIPTextEncoder":
        """A frozen encoder stays in eval mode (as the original's ``disabled_train``)."""
        return super().train(mode and not self.frozen)

    # -- text ----------------------------------------------------------------------------------------------
    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> ids (B, max_length): sot, BPE ids, eot, then ``pad_token``.

        Over-long prompts keep eot at the last position; the cut text is quoted in a warning.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        tok, n = bpe_tokenizer(), self.max_length
        cache = self._ids_cache()
        rows = []
        for text in _checked(prompts):
            ids = cache.get(text)
            if ids is None:
                ids = cache.put(text, self._encode_text(text))
            if len(ids) > n - 2:
                log.warning("The following part of your input was truncated because CLIP can only handle sequences "
                            "up to %d tokens: %s", n, self._decode(list(ids[n - 2:])).strip())
                ids = ids[: n - 2]
            rows.append([tok.sot_token_id, *ids, tok.eot_token_id] + [self.pad_token] * (n - 2 - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), n)

    def _ids_cache(self) -> "IdsCache":
        """The BPE ids of recent prompts (training captions repeat every epoch: open_clip's ftfy and BPE took 26 ms
        for a batch of 128 emoji captions, every step), emptied when the textual-inversion names change."""
        state = tuple(sorted(self.embeddings.items()))
        cache = self.__dict__.get("_prompt_ids")  # a plain attribute: not module state, not saved
        if cache is None or cache.state != state:
            cache = self.__dict__["_prompt_ids"] = IdsCache(state)
        return cache

    # -- textual inversion (ldm.conditioning.embeddings) ---------------------------------------------------
    def add_embedding(self, name: str, vectors: torch.Tensor) -> None:
        """Make ``name`` in a prompt stand for ``vectors`` (n, width): ids past the vocabulary, looked up in a
        buffer beside the token embedding (not saved with the model)."""
        if vectors.ndim != 2 or vectors.shape[1] != self.width:
            raise ValueError(f"embedding {name!r}: vectors {tuple(vectors.shape)} do not fit width {self.width} (an "
                             "embedding for another text encoder?)")
        if name.lower() in {k.lower() for k in self.embeddings}:
            raise ValueError(f"embedding {name!r}: a textual-inversion embedding of that name is already loaded")
        emb = self.model.token_embedding.weight
        extra = getattr(self, "extra_vectors", emb.new_zeros(0, self.width))
        start = emb.shape[0] + extra.shape[0]  # ids V, V+1, … in the order added
        self.register_buffer("extra_vectors", torch.cat([extra, vectors.to(emb)]), persistent=False)
        self.embeddings[name] = (start, vectors.shape[0])

    def _encode_text(self, text: str) -> list[int]:
        from ldm.conditioning.embeddings import split_prompt  # noqa: PLC0415

        named = {k.lower(): v for k, v in self.embeddings.items()}
        ids: list[int] = []
        for piece in split_prompt(text, list(named)):
            hit = named.get(piece.lower())
            ids += list(range(hit[0], hit[0] + hit[1])) if hit else self._bpe(piece)
        return ids

    def _bpe(self, text: str) -> list[int]:
        """BPE ids of text, special-token names read as the layout's tokenizer reads them: transformers'
        CLIPTokenizer's (``<|endoftext|>``, SD v1, layout "hf") or open_clip's (``<end_of_text>``, SD v2)."""
        if self.layout != "hf":
            return bpe_tokenizer().encode(text)
        parts = _HF_SPECIAL_SPLIT.split(text)
        return [i for part in parts for i in ([HF_SPECIAL[part]] if part in HF_SPECIAL else
                                               hf_bpe_tokenizer().encode(part))]

    def _decode(self, ids: list[int]) -> str:
        """Ids back to text; an embedding's ids (or the part of them that is there) become its name once."""
        names = {i: k for k, (s, n) in self.embeddings.items() for i in range(s, s + n)}
        V, out, run, prev = self.model.vocab_size, [], [], None
        for i in [*ids, None]:
            if i is not None and i < V:
                run.append(i)
            elif run:
                out.append(bpe_tokenizer().decode(run))
                run = []
            if i in names and names[i] != names.get(prev):
                out.append(names[i] + " ")
            prev = i
        return "".join(out)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) -> vectors (B, L, W); ids past the vocabulary from the textual-inversion buffer."""
        emb = self.model.token_embedding
        extra = getattr(self, "extra_vectors", None)
        if extra is None:
            return emb(tokens)  # (B, L, W)
        V = emb.weight.shape[0]
        x = emb(tokens.clamp(max=V - 1))  # (B, L, W)
        return torch.where((tokens >= V)[..., None], extra[(tokens - V).clamp(min=0)].to(x.dtype), x)

    def tokenize_long(self, prompts: list[str] | str) -> torch.Tensor:
        """Prompts of any length -> ids (B, k, max_length) in k chunks (:mod:`ldm.conditioning.chunks`)."""
        from ldm.conditioning.chunks import chunk_rows  # noqa: PLC0415

        tok = bpe_tokenizer()
        prompts = _checked([prompts] if isinstance(prompts, str) else list(prompts))
        chunks = [self._chunks(self._encode_text(p)) for p in prompts]
        return chunk_rows(chunks, self.max_length, tok.sot_token_id, tok.eot_token_id, self.pad_token)

    def _chunks(self, ids: list[int]) -> list[list[int]]:
        """One prompt's ids cut into chunks of at most max_length - 2 (:func:`ldm.conditioning.chunks.chunk_ids`)."""
        from ldm.conditioning.chunks import chunk_ids  # noqa: PLC0415

        comma = bpe_tokenizer().encode(",")[0]
        starts = frozenset(s for s, _ in self.embeddings.values())
        return chunk_ids(ids, self.max_length - 2, comma, vocab=self.model.vocab_size, starts=starts)

    def encode_long(self, prompts: list[str] | str) -> torch.Tensor:
        """Prompts of any length -> context (B, k·max_length, width): each chunk encoded on its own, concatenated."""
        ids = self.tokenize_long(prompts)  # (B, k, L)
        return torch.cat([self.encode_tokens(ids[:, j]) for j in range(ids.shape[1])], dim=1)  # (B, k·L, W)

    # -- prompt emphasis (ldm.conditioning.emphasis) -------------------------------------------------------
    def tokenize_weighted(self, prompts: list[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts in the emphasis syntax -> ids (B, k, max_length) in k chunks, as :meth:`tokenize_long` cuts them
        (``BREAK`` also ends a chunk), and each id's weight (B, k, max_length), float32. Each run of text of one
        weight is tokenized on its own (as the web UI does), so the brackets never join or split a word."""
        from ldm.conditioning.chunks import chunk_rows, split_like, weight_rows  # noqa: PLC0415
        from ldm.conditioning.emphasis import parse_emphasis  # noqa: PLC0415

        tok = bpe_tokenizer()
        prompts = _checked([prompts] if isinstance(prompts, str) else list(prompts))
        ids, weights = [], []
        for prompt in prompts:
            segments: list[tuple[list[int], list[float]]] = [([], [])]  # the runs between BREAKs
            for text, w in parse_emphasis(prompt):
                if w is None:
                    segments.append(([], []))
                    continue
                piece = self._encode_text(text)
                segments[-1][0].extend(piece)
                segments[-1][1].extend([w] * len(piece))
            if len(segments) > 1 and not segments[-1][0]:  # a BREAK at the end adds no chunk
                segments.pop()
            chunks = [self._chunks(seg_ids) for seg_ids, _ in segments]
            ids.append([c for seg in chunks for c in seg])
            weights.append([c for seg, (_, ws) in zip(chunks, segments) for c in split_like(ws, seg)])
        rows = chunk_rows(ids, self.max_length, tok.sot_token_id, tok.eot_token_id, self.pad_token)
        return rows, weight_rows(weights, self.max_length)

    def encode_weighted(self, prompts: list[str] | str, mode: str = "original") -> torch.Tensor:
        """Prompts in the emphasis syntax -> context (B, k·max_length, width): each chunk encoded on its own, its
        hidden states weighted (:func:`ldm.conditioning.emphasis.apply_emphasis`, ``mode`` "original" or
        "no_norm"), the chunks concatenated. A prompt without brackets gives :meth:`encode_long`'s context."""
        from ldm.conditioning.emphasis import apply_emphasis, check_mode  # noqa: PLC0415

        check_mode(mode)
        ids, w = self.tokenize_weighted(prompts)  # (B, k, L) each
        return torch.cat([apply_emphasis(self.encode_tokens(ids[:, j]), w[:, j], mode)
                          for j in range(ids.shape[1])], dim=1)  # (B, k·L, W)

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) -> hidden states of ``self.layer`` after ln_final, (B, L, width), causal mask."""
        return self.encode_ids(upload(tokens, self.model.token_embedding.weight.device))

    def encode_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        """:meth:`encode_tokens` for ids already on the parameters' device: the part ``ldm.fast.optimize``
        compiles (no host tensor in the graph, so it can be a CUDA graph)."""
        m = self.model
        L = tokens.shape[1]
        x = self._embed(tokens)  # (B, L, W)
        x = x + m.positional_embedding[:L].to(x.dtype)  # (B, L, W)
        # (L, L) additive causal mask, built here rather than taken from open_clip's non-persistent buffer, which
        # stays on the meta device when a model built on meta is loaded with load_state_dict(assign=True)
        mask = torch.full((L, L), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
        batch_first = getattr(m.transformer, "batch_first", True)
        x = x if batch_first else x.transpose(0, 1)
        for block in m.transformer.resblocks[: self.num_layers - LAYERS[self.layer]]:
            x = block(x, attn_mask=mask)  # (B, L, W)
        x = x if batch_first else x.transpose(0, 1)
        return m.ln_final(x)  # (B, L, W)

    def forward(self, prompts: list[str]) -> torch.Tensor:
        """Prompts (B) -> context c (B, max_length, width) in the parameters' dtype."""
        return self.encode_tokens(self.tokenize(prompts))

    # -- contrastive (stage 0, with_visual=True) -----------------------------------------------------------
    def _need_visual(self, what: str) -> None:
        if not self.with_visual:
            raise RuntimeError(f"{what} needs OpenCLIPTextEncoder(with_visual=True)")

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Images (B, 3, H, W), CLIP-normalized -> projected image features (B, embed_dim)."""
        self._need_visual("encode_image")
        return self.model.encode_image(images, normalize=normalize)  # (B, E)

    def encode_text_features(self, text: list[str] | torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Prompts or ids (B, L) -> pooled (end-of-text token), projected text features (B, embed_dim).

        Ids shorter than the context (``max_length`` < context_length) are padded to it with ``pad_token``:
        open_clip's tower adds its whole positional table, and under the causal mask the padding after end-of-text
        leaves the pooled feature unchanged."""
        self._need_visual("encode_text_features")
        tokens = self.tokenize(text) if not torch.is_tensor(text) else text  # (B, L)
        short = self.model.context_length - tokens.shape[1]
        if short > 0:
            tokens = torch.nn.functional.pad(tokens, (0, short), value=self.pad_token)  # (B, context_length)
        return self.model.encode_text(upload(tokens, self.model.token_embedding.weight.device), normalize=normalize)

    # -- weights -------------------------------------------------------------------------------------------
    def load_weights(self, path: str) -> None:
        """Load a local weights file (open_clip or HF CLIP layout, detected from the keys) into the model."""
        sd = open_clip_keys(read_state_dict(path), self.num_layers, path)
        missing, unexpected = self.model.load_state_dict(sd, strict=False)
        bad_u = [k for k in unexpected if not (k.startswith("visual.") or k in _OPTIONAL)]
        bad_m = [k for k in missing if not (k.startswith("visual.") or k in _OPTIONAL)]
        if bad_u or bad_m:
            raise ValueError(f"weights {path!r} do not match the text encoder: missing {bad_m[:5]}, "
                             f"unexpected {bad_u[:5]} (totals {len(bad_m)}, {len(bad_u)})")
        if missing:
            log.warning("weights %s: %d key(s) not in the file keep their initialisation: %s",
                        path, len(missing), ", ".join(missing[:5]))
        if unexpected:
            log.info("weights %s: ignored %d key(s) this encoder does not use (e.g. %s)", path, len(unexpected),
                     unexpected[0])


# -- HF layout state-dict hooks ---------------------------------------------------------------------------------
def _export_hf(module: OpenCLIPTextEncoder, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """``model.<open_clip key>`` -> ``transformer.<CLIPTextModel key>`` in an outgoing state dict."""
    inner = prefix + "model."
    sub = {k[len(inner):]: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(inner)]}
    for key, value in open_clip_to_hf(sub).items():
        state_dict[prefix + "transformer." + key] = value


def _import_hf(module: OpenCLIPTextEncoder, state_dict: dict, prefix: str, *args: Any) -> None:
    """``transformer.<CLIPTextModel key>`` -> ``model.<open_clip key>`` in an incoming state dict.

    ``position_ids`` (in older SD v1 files) is accepted and dropped."""
    outer = prefix + "transformer."
    # unknown keys stay where they are, so that torch reports them as unexpected (strict) or ignores them
    keys = [k for k in state_dict if k.startswith(outer) and is_hf_text_key(k[len(outer):])]
    if not keys:
        return  # nothing for us (a partial, non-strict load); torch reports the missing keys
    sub = {k[len(outer):]: state_dict.pop(k) for k in keys}
    for key, value in hf_to_open_clip(sub, module.num_layers).items():
        state_dict[prefix + "model." + key] = value


# -- weights files ----------------------------------------------------------------------------------------------
def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A flat state dict from a local .safetensors, or .pt/.pth/.bin/.ckpt file (:func:`ldm.checkpoint.read_state_dict`:
    pickles read weights-only, Lightning's ``state_dict`` unwrapped)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text encoder weights file {path!r} does not exist")
    return checkpoint.read_state_dict(path)[0]


def open_clip_keys(sd: Mapping[str, torch.Tensor], num_layers: int, path: str = "weights") -> dict[str, torch.Tensor]:
    """Find the text tower in ``sd`` (any outer prefix, open_clip or HF layout) and return open_clip keys."""
    hf_anchor, oc_anchor = "embeddings.token_embedding.weight", "token_embedding.weight"
    anchor = next((k for k in sd if k.endswith(oc_anchor) and not k.startswith("visual.")), None)
    if anchor is None:
        raise KeyError(f"{path}: no '*token_embedding.weight' key; not a CLIP text encoder")
    if anchor.endswith(hf_anchor):  # HF: <root>text_model.embeddings… (transformers < 5) or <root>embeddings…
        body = anchor[: -len(hf_anchor)]
        root = body[: -len("text_model.")] if body.endswith("text_model.") else body
        roots = ("embeddings", "encoder", "final_layer_norm")
        text = {k[len(body):]: v for k, v in sd.items()
                if k.startswith(body) and k[len(body):].split(".", 1)[0] in roots}
        if root + "text_projection.weight" in sd:  # CLIPTextModelWithProjection / CLIPModel
            text["text_projection.weight"] = sd[root + "text_projection.weight"]
        out = hf_to_open_clip(text, num_layers)
        if root + "logit_scale" in sd:  # a full CLIPModel file
            out["logit_scale"] = sd[root + "logit_scale"]
        log.info("%s: converted Hugging Face CLIP text weights (prefix %r) to open_clip layout", path, body)
        return out
    prefix = anchor[: -len(oc_anchor)]
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


# -- factories for the original SD YAML targets -----------------------------------------------------------------
def frozen_clip_embedder(version: str = "openai/clip-vit-large-patch14", device: Any = None, max_length: int = 77,
                         freeze: bool = True, layer: str = "last", layer_idx: int | None = None,
                         **unknown: Any) -> OpenCLIPTextEncoder:
    """``ldm.modules.encoders.modules.FrozenCLIPEmbedder`` (SD v1): CLIP ViT-L/14, HF layout, pad 49407.

    ``version`` is not downloaded (the weights come from the checkpoint); ``device`` is ignored (the enclosing
    model's ``.to()`` places it). The original's ``layer="pooled"``/``"hidden"`` are not supported.
    """
    if unknown:
        raise TypeError(f"frozen_clip_embedder: unknown argument(s) {', '.join(map(repr, unknown))}")
    if layer not in LAYERS or layer_idx is not None:
        raise ValueError(f"frozen_clip_embedder: layer {layer!r} (layer_idx={layer_idx}) not supported; "
                         f"use one of {tuple(LAYERS)} without layer_idx")
    log.info("FrozenCLIPEmbedder: %r is not downloaded; its weights come from the checkpoint (device=%r ignored)",
             version, device)
    return OpenCLIPTextEncoder("ViT-L-14", layer=layer, layout="hf", pad_token=EOT_TOKEN, max_length=max_length,
                               freeze=freeze, quick_gelu=True)


def frozen_open_clip_embedder(arch: str = "ViT-H-14", version: str = "laion2b_s32b_b79k", device: Any = None,
                              max_length: int = 77, freeze: bool = True, layer: str = "last") -> OpenCLIPTextEncoder:
    """``ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder`` (SD v2): open_clip layout, pad 0.

    The default ``layer`` is the original class's "last"; the SD 2 YAMLs set ``layer: "penultimate"``.
    ``version`` (an open_clip pretrained tag) is not downloaded; ``device`` is ignored.
    """
    log.info("FrozenOpenCLIPEmbedder: %s/%s is not downloaded; its weights come from the checkpoint "
             "(device=%r ignored)", arch, version, device)
    return OpenCLIPTextEncoder(arch, layer=layer, layout="open_clip", pad_token=0, max_length=max_length,
                               freeze=freeze)
