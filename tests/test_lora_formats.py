"""LoRA files of other tools (kohya-ss / web UIs, diffusers / peft) merged into our U-Net and text encoder, against
diffusers' own loader (``load_lora_weights`` + ``fuse_lora``, peft underneath) on the same exported weights.

Measured on the dev CPU (diffusers 0.42.1, peft 0.21.2): every merged weight equal to diffusers' (max difference 0.0)
for v1 (1×1-conv proj_in, HF-layout text encoder) and v2 (linear proj_in, open_clip's fused q/k/v).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from omegaconf import OmegaConf
from test_convert_diffusers import _tiny_model

import ldm
from ldm.checkpoint import META_CONFIG, CheckpointError, read_state_dict, save_safetensors
from ldm.convert import export_diffusers
from ldm.convert.diffusers_text import text_encoder_to_hf
from ldm.convert.diffusers_unet import unet_ldm_to_diffusers
from ldm.lora_formats import merge_lora_file
from script_loader import load_script

diffusers = pytest.importorskip("diffusers", reason="diffusers is a dev dependency")  # missing: the install broke
pytest.importorskip("peft", reason="peft is a dev dependency (diffusers' LoRA loader)")
UNET_ENDS = ("attn1.to_q", "attn2.to_k", "attn2.to_v", "attn1.to_out.0", "proj_in", "ff.net.0.proj",
             "resnets.0.conv1", "time_emb_proj")  # linear, 1×1 (v1) or linear (v2) proj_in, 3×3 conv (LoCon)
TEXT_MODULES = ("text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.0.self_attn.v_proj",
                "text_model.encoder.layers.0.mlp.fc1", "text_model.encoder.layers.1.self_attn.out_proj")


def _ours_in_diffusers_names(model) -> tuple[dict, dict]:
    unet = {k[len("model.diffusion_model."):]: v for k, v in model.state_dict().items()
            if k.startswith("model.diffusion_model.")}
    enc = model.cond_stage_model
    return (unet_ldm_to_diffusers(unet, model.config.model.params.unet_config.params),
            text_encoder_to_hf(enc.state_dict(), enc.layout, enc.num_layers, "last"))


def _pair(shape: tuple, r: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random A (down) and B (up) for a weight of ``shape``: Linear, 1×1 or k×k convolution."""
    if len(shape) == 4:
        return (torch.randn(r, shape[1], shape[2], shape[3], generator=g) * 0.1,
                torch.randn(shape[0], r, 1, 1, generator=g) * 0.1)
    return torch.randn(r, shape[1], generator=g) * 0.1, torch.randn(shape[0], r, generator=g) * 0.1


def _kohya_file(unet: dict, text: dict, seed: int = 1) -> dict[str, torch.Tensor]:
    g, out = torch.Generator().manual_seed(seed), {}
    mods = sorted({k[:-7] for k in unet if k.endswith(".weight") and k[:-7].endswith(UNET_ENDS)})
    for tag, names, weights, alpha in (("unet", mods, unet, 1.0), ("te", TEXT_MODULES, text, 4.0)):
        for m in names:
            down, up = _pair(tuple(weights[m + ".weight"].shape), 2, g)
            name = f"lora_{tag}_{m.replace('.', '_')}"
            out.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                        f"{name}.alpha": torch.tensor(alpha)})
    return out


def _theirs(pipe, lora: dict, scale: float) -> tuple[dict, dict]:
    pipe.load_lora_weights(copy.deepcopy(lora))
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()  # the fused weights stay; peft's layers go
    text = {k if k.startswith("text_model.") else "text_model." + k: v
            for k, v in pipe.text_encoder.state_dict().items()}  # transformers >= 5 drops "text_model."
    return dict(pipe.unet.state_dict()), text


def _convert_script():
    return load_script("convert")


def _max_diff(ours: dict, theirs: dict) -> float:
    shared = [k for k in theirs if k in ours]
    assert len(shared) >= len(theirs) - 1  # all but position_ids
    return max((ours[k].float() - theirs[k].float()).abs().max().item() for k in shared)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_kohya_lora_merges_as_diffusers_does(version, tmp_path) -> None:
    model = _tiny_model(version)
    export_diffusers(model, tmp_path / "sd")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "sd", local_files_only=True)
    unet0, text0 = (copy.deepcopy(d) for d in _ours_in_diffusers_names(model))
    lora = _kohya_file(unet0, text0)
    their_unet, their_text = _theirs(pipe, lora, 0.7)
    assert merge_lora_file(model, lora, 0.7) == len(lora) // 3
    unet1, text1 = _ours_in_diffusers_names(model)
    assert _max_diff(unet1, their_unet) == 0.0 and _max_diff(text1, their_text) == 0.0
    changed = [k for k in unet0 if not torch.equal(unet0[k], unet1[k])]
    assert len(changed) == sum(k.endswith("lora_up.weight") and k.startswith("lora_unet_") for k in lora)
    assert sum(not torch.equal(text0[k], text1[k]) for k in text0) == len(TEXT_MODULES)


def test_diffusers_peft_lora_file_merges_as_diffusers_does(tmp_path) -> None:
    """A peft adapter with α ≠ r (α in the file's metadata, as diffusers >= 0.34 writes it), loaded from the file as
    diffusers loads it; and the attention-processor names of older diffusers files, for the same matrices."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = _tiny_model("v1")
    export_diffusers(model, tmp_path / "sd")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "sd", local_files_only=True)
    donor = copy.deepcopy(pipe.unet)  # trains nothing: a LoRA with random B, as after some steps
    cfg = LoraConfig(r=4, lora_alpha=16, init_lora_weights="gaussian",
                     target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    donor.add_adapter(cfg)
    with torch.no_grad():
        for n, p in donor.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    diffusers.StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", get_peft_model_state_dict(donor),
                                                         unet_lora_adapter_metadata=cfg.to_dict())
    file = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    lora, meta = read_state_dict(file)
    assert all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in lora)
    pipe.load_lora_weights(str(file))
    pipe.fuse_lora(lora_scale=0.5)
    pipe.unload_lora_weights()
    base = copy.deepcopy(model)
    assert merge_lora_file(model, lora, 0.5, meta) == len(lora) // 2
    assert _max_diff(_ours_in_diffusers_names(model)[0], dict(pipe.unet.state_dict())) < 1e-7

    def processor_name(k: str) -> str:  # "….attn1.to_q.lora_A.weight" → "….attn1.processor.to_q_lora.down.weight"
        module, _, ab = k.rpartition(".lora_")
        head, _, proj = module.replace(".to_out.0", ".to_out").rpartition(".")
        return f"{head}.processor.{proj}_lora.{'down' if ab.startswith('A') else 'up'}.weight"

    old = {processor_name(k): v for k, v in lora.items()}
    text = {k: v.clone() for k, v in _ours_in_diffusers_names(base)[1].items()}  # old names: self_attn.to_q_lora…
    g = torch.Generator().manual_seed(7)
    for proj in ("to_q", "to_out"):
        down, up = _pair(tuple(text["text_model.encoder.layers.0.self_attn.q_proj.weight"].shape), 2, g)
        old[f"text_encoder.text_model.encoder.layers.0.self_attn.{proj}_lora.down.weight"] = down
        old[f"text_encoder.text_model.encoder.layers.0.self_attn.{proj}_lora.up.weight"] = up
    assert merge_lora_file(base, old, 0.5 * 16 / 4) == len(lora) // 2 + 2  # no α in that format: α/r as strength
    assert _max_diff(_ours_in_diffusers_names(base)[0], _ours_in_diffusers_names(model)[0]) < 1e-6
    changed = [k for k, v in _ours_in_diffusers_names(base)[1].items() if not torch.equal(v, text[k])]
    assert sorted(changed) == ["text_model.encoder.layers.0.self_attn.out_proj.weight",
                               "text_model.encoder.layers.0.self_attn.q_proj.weight"]


def test_load_takes_several_files_with_their_strengths_and_names_a_bad_one(tmp_path) -> None:
    torch.manual_seed(0)
    base = ldm.load(config="configs/tiny/txt2img.yaml")
    ckpt = ldm.save(base, tmp_path / "tiny.safetensors")
    unet, text = _ours_in_diffusers_names(base)
    a, b = _kohya_file(unet, text, seed=1), _kohya_file(unet, text, seed=2)
    save_safetensors(a, tmp_path / "a.safetensors")
    save_safetensors(b, tmp_path / "b.safetensors")
    both = ldm.load(ckpt, lora=[tmp_path / "a.safetensors", tmp_path / "b.safetensors"], lora_scale=[1.0, 0.5])
    ref = ldm.load(ckpt)
    merge_lora_file(ref, a, 1.0)
    merge_lora_file(ref, b, 0.5)
    assert all(torch.equal(x, y) for x, y in zip(both.state_dict().values(), ref.state_dict().values()))
    assert any(not torch.equal(x, y) for x, y in zip(both.state_dict().values(), base.state_dict().values()))

    sdxl = dict(a, **{"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(2, 8),
                      "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(8, 2)})
    save_safetensors(sdxl, tmp_path / "sdxl.safetensors")
    with pytest.raises(CheckpointError, match=r"sdxl.safetensors: LoRA file: 1 module\(s\) not in this .*blocks_4"):
        ldm.load(ckpt, lora=tmp_path / "sdxl.safetensors")
    loha = {"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(2, 2)}
    save_safetensors(loha, tmp_path / "loha.safetensors")
    with pytest.raises(CheckpointError, match="LyCORIS"):
        ldm.load(ckpt, lora=tmp_path / "loha.safetensors")
    with pytest.raises(ValueError, match="lora_scale has 2 value"):
        ldm.load(ckpt, lora=tmp_path / "a.safetensors", lora_scale=[1.0, 2.0])
    with pytest.raises(ValueError, match="lora_scale must be finite"):
        ldm.load(ckpt, lora=tmp_path / "a.safetensors", lora_scale=float("nan"))
    ours = {"model.diffusion_model.output_blocks.9.1.transformer_blocks.0.attn1.to_q.lora_A": torch.zeros(2, 8),
            "model.diffusion_model.output_blocks.9.1.transformer_blocks.0.attn1.to_q.lora_B": torch.zeros(8, 2)}
    save_safetensors(ours, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="other.safetensors: does not fit this model's U-Net"):
        ldm.load(ckpt, lora=tmp_path / "other.safetensors")


def _save_our_lora(model, path, std: float) -> None:
    """Attach rank-2 adapters of ours to ``model`` with random B (std ``std``) and save them as a LoRA file."""
    from ldm.lora import add_lora, lora_state_dict

    add_lora(model.model, rank=2)
    with torch.no_grad():
        for n, p in model.model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, std)
    save_safetensors({"model." + k: v for k, v in lora_state_dict(model.model).items()}, path)


@pytest.mark.parametrize("kind", ["kohya", "ours-merged"])
def test_a_lora_merged_after_optimize_reaches_the_fused_projections(kind, tmp_path) -> None:
    """ldm.fast.optimize keeps fused/hoisted copies of the q/k/v and conditioning weights; a LoRA merged into the
    weights afterwards (ldm.addons.attach_lora) must reach them: the same images as with the LoRA loaded first."""
    from ldm.addons import attach_lora
    from ldm.fast import optimize

    torch.manual_seed(0)
    base = ldm.load(config="configs/tiny/txt2img.yaml")
    with torch.no_grad():  # the zero-initialised output layers would hide every other weight
        for p in base.unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ckpt = ldm.save(base, tmp_path / "tiny.safetensors")
    if kind == "kohya":
        save_safetensors(_kohya_file(*_ours_in_diffusers_names(base)), tmp_path / "l.safetensors")
    else:
        _save_our_lora(base, tmp_path / "l.safetensors", std=0.5)
    kw = dict(steps=2, height=32, width=32, seed=0, progress=False, output="tensor")
    first = optimize(ldm.load(ckpt, lora=tmp_path / "l.safetensors", merge_lora=True), compile=False)
    late = optimize(ldm.load(ckpt), compile=False)
    without = late.generate("a red apple", **kw)
    attach_lora(late, tmp_path / "l.safetensors", merge=True)
    with torch.no_grad():
        ref, got = first.generate("a red apple", **kw), late.generate("a red apple", **kw)
    assert not torch.allclose(ref, without, atol=1e-4)  # the LoRA changes the images
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_our_lora_file_takes_a_strength(tmp_path) -> None:
    torch.manual_seed(0)
    model = ldm.load(config="configs/tiny/txt2img.yaml")
    ckpt = ldm.save(model, tmp_path / "tiny.safetensors")
    _save_our_lora(model, tmp_path / "ours.safetensors", std=0.1)
    w = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    file = tmp_path / "ours.safetensors"
    full, half, base = (ldm.load(ckpt, lora=file, merge_lora=True, lora_scale=s).state_dict()[w] for s in (1, 0.5, 0))
    torch.testing.assert_close(half - base, (full - base) * 0.5)
    assert not torch.equal(full, base)


def test_convert_merge_bakes_a_lora_into_a_checkpoint(tmp_path) -> None:
    script = _convert_script()
    torch.manual_seed(0)
    base = ldm.load(config="configs/tiny/txt2img.yaml")
    ckpt = ldm.save(base, tmp_path / "tiny.safetensors")
    save_safetensors(_kohya_file(*_ours_in_diffusers_names(base)), tmp_path / "style.safetensors")
    out = tmp_path / "styled.safetensors"
    assert script.main(["merge", str(ckpt), str(out), "--lora", str(tmp_path / "style.safetensors"),
                        "--lora-scale", "0.8", "--fp16"]) == 0
    merged, meta = read_state_dict(out)
    ref = ldm.load(ckpt, lora=tmp_path / "style.safetensors", lora_scale=0.8).state_dict()
    assert set(merged) == set(ref) and "ldm_config" in " ".join(meta)
    assert all(merged[k].dtype == torch.float16 and torch.equal(merged[k], ref[k].half()) for k in ref)
    assert script.main(["merge", str(ckpt), str(tmp_path / "none.safetensors")]) == 2  # nothing to merge


def test_our_lora_exported_for_other_tools_gives_the_same_weights_in_diffusers(tmp_path) -> None:
    from ldm.lora import add_lora, lora_state_dict, merge_lora
    from ldm.lora_formats import to_kohya

    model = _tiny_model("v1")
    export_diffusers(model, tmp_path / "sd")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "sd", local_files_only=True)
    add_lora(model.model, rank=2, alpha=4.0)  # α/r = 2
    with torch.no_grad():
        for n, p in model.model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    ours = {"model." + k: v for k, v in lora_state_dict(model.model).items()}
    kohya = to_kohya(ours, model.config.model.params.unet_config.params)
    assert len(kohya) == 3 * sum(k.endswith("lora_A") for k in ours)
    assert all(k.startswith("lora_unet_") for k in kohya)
    merge_lora(model.model)  # our own merge: W + 2·BA
    their_unet, _ = _theirs(pipe, kohya, 1.0)
    assert _max_diff(_ours_in_diffusers_names(model)[0], their_unet) < 1e-6
    file = tmp_path / "lora.safetensors"  # as LoRA fine-tuning writes it: the config in the metadata
    save_safetensors(ours, file, {META_CONFIG: json.dumps(OmegaConf.to_container(model.config, resolve=True))})
    assert _convert_script().main(["lora-to-kohya", str(file), str(tmp_path / "k.safetensors")]) == 0
    written, _ = read_state_dict(tmp_path / "k.safetensors")
    assert set(written) == set(kohya) and all(torch.equal(written[k], kohya[k]) for k in kohya)
