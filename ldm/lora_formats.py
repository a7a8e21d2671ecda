"""LoRA files made by other tools, merged into our weights (U-Net and text encoder).

Formats: kohya-ss / the SD web UIs (``lora_unet_<module>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``;
``lora_te_<module>`` for the text encoder; convolutions too, "LoCon") and diffusers / peft
(``unet.<module>.lora_A.weight``, ``lora_B``; the older ``lora.down``/``lora.up``, ``lora_linear_layer`` and
attention-processor names; ``text_encoder.<module>``). Module names are diffusers' (U-Net) and ``CLIPTextModel``'s
(text encoder); they are mapped onto ours with the same key maps as the diffusers folder conversion.

Each adapter adds ΔW = s · (α / r) · B A to its weight (Hu et al. 2021, eq. 3 and the α/r scaling of §4.1), s the
user's strength; α defaults to r. For a convolution, A is (r, C_in, k, k) and B (C_out, r, 1, 1), and
ΔW = (B.flatten(1) · A.flatten(1)).reshape(C_out, C_in, k, k).
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch

log = logging.getLogger(__name__)

# (down, up) suffixes of the formats we read, longest first
_PAIRS = ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"),
          (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"), (".lora.down.weight", ".lora.up.weight"),
          ("_lora.down.weight", "_lora.up.weight"))  # the last: diffusers' attention processors, "…processor.to_q_lora"
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)$")
_OLD_TEXT = re.compile(r"self_attn\.(to_q|to_k|to_v|to_out)$")  # diffusers' old text-encoder LoRA (q/k/v/out_proj)
_OLD_TEXT_NAMES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
KOHYA_METADATA = {"ss_network_module": "networks.lora"}  # what kohya-ss writes: the web UIs read it as plain LoRA
PEFT_METADATA = "lora_adapter_metadata"  # diffusers >= 0.34 writes peft's LoraConfig there, keys "unet.lora_alpha" …
_UNSUPPORTED = ("hada_w1_a", "lokr_w1", "lora_mid", "oft_blocks", "diff_b")  # LyCORIS LoHa/LoKr/Tucker/OFT, biases


@dataclass
class Adapter:
    """One low-rank update: which part and module (diffusers/HF dotted path), A (down), B (up) and α."""

    part: str  # "unet" or "text"
    module: str
    down: torch.Tensor  # A: (r, C_in) or (r, C_in, k, k)
    up: torch.Tensor  # B: (C_out, r) or (C_out, r, 1, 1)
    alpha: float | None

    def delta(self, shape: torch.Size, scale: float) -> torch.Tensor:
        """ΔW in float32, shaped as the weight it adds to."""
        r = self.down.shape[0]
        a = self.alpha if self.alpha is not None else float(r)
        dw = self.up.float().flatten(1) @ self.down.float().flatten(1)  # (C_out, C_in·k·k)
        if dw.numel() != torch.Size(shape).numel():
            raise ValueError(f"LoRA for {self.part} module {self.module!r}: B·A has {tuple(dw.shape)} elements "
                             f"for a weight of shape {tuple(shape)}")
        return dw.reshape(shape) * (scale * a / r)


def is_ldm_lora(sd: Mapping[str, torch.Tensor]) -> bool:
    """Our own adapter files (``model.diffusion_model.….lora_A``), written by LoRA fine-tuning."""
    return any(k.startswith("model.") and k.endswith(("lora_A", "lora_B")) for k in sd)


def _split_pairs(sd: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """{full module name as written: {"down", "up", "alpha"}}; an unknown key or format is an error."""
    bad = [k for k in sd if any(u in k for u in _UNSUPPORTED)]
    if bad:
        raise ValueError(f"LoRA file: {len(bad)} key(s) of a LyCORIS/bias variant this loader does not merge "
                         f"(LoHa, LoKr, Tucker, OFT, bias deltas), e.g. {bad[0]!r}; plain LoRA/LoCon only")
    mods: dict[str, dict[str, Any]] = {}
    unknown = []
    for k, v in sd.items():
        for down, up in _PAIRS:
            if k.endswith(down) or k.endswith(up):
                role, end = ("down", down) if k.endswith(down) else ("up", up)
                mods.setdefault(k[: -len(end)], {})[role] = v
                break
        else:
            if k.endswith(".alpha"):
                mods.setdefault(k[: -len(".alpha")], {})["alpha"] = float(v)
            else:
                unknown.append(k)
    if unknown:
        raise ValueError(f"LoRA file: {len(unknown)} key(s) of no known LoRA layout, e.g. {unknown[:3]}")
    half = [m for m, d in mods.items() if "down" not in d or "up" not in d]
    if half:
        raise ValueError(f"LoRA file: {len(half)} module(s) with only one of the down/up matrices, e.g. {half[0]!r}")
    return mods


def _module_name(written: str, kohya: Mapping[str, tuple[str, str]]) -> tuple[str, str] | None:
    """(part, dotted module) for a module name as written in the file, or None when it fits nothing."""
    if written.startswith(("lora_unet_", "lora_te_")):
        return kohya.get(written)
    for prefix, part in (("unet.", "unet"), ("text_encoder.", "text")):
        if written.startswith(prefix):
            name = _PROCESSOR.sub(lambda m: "." + m.group(1) + (".0" if m.group(1) == "to_out" else ""),
                                  written[len(prefix):])
            if part == "text":
                if not name.startswith("text_model."):  # transformers >= 5 names, no "text_model."
                    name = "text_model." + name
                name = _OLD_TEXT.sub(lambda m: "self_attn." + _OLD_TEXT_NAMES[m.group(1)], name)
            return part, name
    return None


def peft_alpha(meta: Mapping[str, str], part: str, module: str, rank: int) -> float | None:
    """α of a diffusers/peft adapter from the file's ``lora_adapter_metadata`` (peft's ``lora_alpha``, its
    ``alpha_pattern`` by module-name suffix, ``use_rslora``: scale α/√r, returned as the α with that α/r), or None."""
    if PEFT_METADATA not in meta:
        return None
    cfg = json.loads(meta[PEFT_METADATA])
    prefix = "unet." if part == "unet" else "text_encoder."
    alpha = cfg.get(prefix + "lora_alpha")
    for pattern, a in (cfg.get(prefix + "alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?({pattern})", module):
            alpha = a
            break
    if alpha is None:
        return None
    return float(alpha) * (math.sqrt(rank) if cfg.get(prefix + "use_rslora") else 1.0)


def parse_lora(sd: Mapping[str, torch.Tensor], modules: Mapping[str, set[str]],
               meta: Mapping[str, str] | None = None) -> list[Adapter]:
    """The adapters of a kohya or diffusers LoRA file. ``modules``: {"unet": diffusers module names, "text": HF
    ``CLIPTextModel`` module names} of the model it is for (kohya's names are these with "." → "_"); ``meta``: the
    file's safetensors metadata (peft's α, when the file has no ``.alpha`` keys)."""
    kohya = {f"lora_{tag}_{m.replace('.', '_')}": (part, m)
             for part, tag in (("unet", "unet"), ("text", "te")) for m in modules[part]}
    out, unmatched = [], []
    for written, d in _split_pairs(sd).items():
        hit = _module_name(written, kohya)
        if hit is None or hit[1] not in modules[hit[0]]:
            unmatched.append(written)
            continue
        alpha = d.get("alpha")
        if alpha is None and not written.startswith("lora_"):
            alpha = peft_alpha(meta or {}, hit[0], hit[1], d["down"].shape[0])
        out.append(Adapter(hit[0], hit[1], d["down"], d["up"], alpha))
    if unmatched:
        raise ValueError(f"LoRA file: {len(unmatched)} module(s) not in this model, e.g. {unmatched[:3]} (a LoRA for "
                         "another architecture, e.g. SDXL or SD 2.x on SD 1.x?)")
    return out


# ------------------------------------------------------------------------------------------------------- merging
UNET_PREFIX = "model.diffusion_model."
TEXT_PREFIX = "cond_stage_model."


def _part(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of the model's state dict ``sd`` under ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _unet_weights(model: Any, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our U-Net's weights (from the model's state dict ``sd``) in diffusers' names (views, no copies)."""
    from ldm.convert.diffusers_unet import unet_ldm_to_diffusers  # noqa: PLC0415
    from ldm.lora import strip_lora  # noqa: PLC0415

    return unet_ldm_to_diffusers(strip_lora(_part(sd, UNET_PREFIX)), model.config.model.params.unet_config.params)


def _text_weights(model: Any, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our text encoder's weights (from the model's state dict ``sd``) in ``CLIPTextModel``'s names, every layer;
    {} for a non-CLIP encoder."""
    from ldm.convert.diffusers_text import text_encoder_to_hf  # noqa: PLC0415

    enc = model.cond_stage_model
    if not hasattr(enc, "layout"):
        return {}
    return text_encoder_to_hf(_part(sd, TEXT_PREFIX), enc.layout, enc.num_layers, "last")


def _merge_text(model: Any, sd: Mapping[str, torch.Tensor], hf_deltas: Mapping[str, torch.Tensor],
                hf: Mapping[str, torch.Tensor]) -> None:
    """Add ΔW given in HF names to our text encoder (its weights from the model's state dict ``sd``): the deltas
    (zeros elsewhere, as stride-0 views) take the same conversion as the weights (linear: renames, and open_clip's
    q ‖ k ‖ v concatenation), then load strictly."""
    from ldm.convert.diffusers_text import text_encoder_from_hf  # noqa: PLC0415

    enc = model.cond_stage_model
    ours = _part(sd, TEXT_PREFIX)
    full = {k: hf_deltas[k] if k in hf_deltas else torch.zeros(()).expand(v.shape) for k, v in hf.items()}
    back = text_encoder_from_hf(full, ours, enc.layout, "last")
    new = {k: (v.float() + back[k].to(v.device)).to(v.dtype) if k in back and bool(back[k].any()) else v
           for k, v in ours.items()}
    enc.load_state_dict(new)


def merge_lora_file(model: Any, sd: Mapping[str, torch.Tensor], scale: float = 1.0,
                    meta: Mapping[str, str] | None = None) -> int:
    """Merge a kohya or diffusers LoRA state dict into ``model``'s U-Net and text encoder with strength ``scale``.

    Returns the number of adapted weights. Raises ValueError naming the keys that fit no module of the model.
    """
    from ldm.convert.diffusers_unet import unet_diffusers_to_ldm  # noqa: PLC0415

    own = model.state_dict()  # taken once: the U-Net and the text encoder each read their part of it
    unet_w, text_w = _unet_weights(model, own), _text_weights(model, own)
    modules = {"unet": {k[:-len(".weight")] for k in unet_w if k.endswith(".weight")},
               "text": {k[:-len(".weight")] for k in text_w if k.endswith(".weight")}}
    adapters = parse_lora(sd, modules, meta)
    deltas: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "text": {}}
    for a in adapters:
        key = a.module + ".weight"
        shape = (unet_w if a.part == "unet" else text_w)[key].shape
        deltas[a.part][key] = deltas[a.part].get(key, 0) + a.delta(shape, scale)
    unet = unet_diffusers_to_ldm(deltas["unet"], model.config.model.params.unet_config.params)
    params = dict(model.model.diffusion_model.named_parameters())
    with torch.no_grad():
        for k, dw in unet.items():
            p = params[k]
            p.copy_((p.float() + dw.to(p.device)).to(p.dtype))  # summed in fp32, then the model's dtype
        if deltas["text"]:
            _merge_text(model, own, deltas["text"], text_w)
    n_unet, n_text = len(deltas["unet"]), len(deltas["text"])
    log.info("merged a LoRA at strength %g: %d U-Net and %d text-encoder weights", scale, n_unet, n_text)
    return n_unet + n_text


# ------------------------------------------------------------------------------------------------------- export
def to_kohya(sd: Mapping[str, torch.Tensor], unet_params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Our adapter file (``model.diffusion_model.<module>.lora_A``/``lora_B``/``lora_scale``) in kohya-ss's layout
    (``lora_unet_<diffusers module>.lora_down.weight``/``lora_up.weight``/``alpha``), which the web UIs, ComfyUI and
    diffusers' ``load_lora_weights`` read. α = scale · r, so that α / r is our scale."""
    from ldm.convert.diffusers_unet import unet_keymap  # noqa: PLC0415

    km = unet_keymap(unet_params)
    out: dict[str, torch.Tensor] = {}
    for key in sorted(k for k in sd if k.endswith(".lora_A")):
        module = key[: -len(".lora_A")]
        if not module.startswith(UNET_PREFIX):
            raise ValueError(f"to_kohya: {key!r} is not a U-Net adapter ({UNET_PREFIX}…)")
        if module + ".lora_B" not in sd:
            raise ValueError(f"to_kohya: {key!r} has no {module + '.lora_B'!r} beside it")
        down, up = sd[key], sd[module + ".lora_B"]
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(f"to_kohya: {module!r}: lora_A {tuple(down.shape)} and lora_B {tuple(up.shape)} are not "
                             "an (r, in) and (out, r) pair")
        (theirs,) = km.forward({module[len(UNET_PREFIX):] + ".weight": down}, "LoRA module")
        name = "lora_unet_" + theirs[: -len(".weight")].replace(".", "_")
        scale = float(sd.get(module + ".lora_scale", torch.tensor(1.0)))
        out.update({f"{name}.lora_down.weight": down.contiguous(), f"{name}.lora_up.weight": up.contiguous(),
                    f"{name}.alpha": torch.tensor(scale * down.shape[0], dtype=torch.float32)})
    if not out:
        peft = any(k.endswith((".lora_A.weight", ".lora_down.weight")) for k in sd)
        raise ValueError("to_kohya: no adapters of ours (model.diffusion_model.….lora_A) in the file" + (
            "; it is a diffusers/peft or kohya LoRA, which loads as it is" if peft else ""))
    return out
