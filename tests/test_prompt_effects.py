"""Prompt conditioning as the user sees it: one prompt given as a str, CLIP skip against diffusers' rule, the
tokenizer's edge cases against transformers' CLIPTokenizer, long negative prompts."""
from __future__ import annotations

import pytest
import torch

import ldm
from test_convert_diffusers import _tiny_model
from test_text_encoder import _hf_clip_tokenizer

diffusers = pytest.importorskip("diffusers", reason="diffusers is a dev dependency")  # missing: the install broke


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return ldm.load(config="configs/tiny/txt2img.yaml")


@pytest.mark.parametrize("long", [False, True])
def test_one_prompt_as_a_str_is_one_prompt(tiny, long) -> None:
    c = tiny.encode_text("a red cat", long=long)
    assert c.shape == (1, 77, tiny.cond_stage_model.width)  # not one context per character
    torch.testing.assert_close(c, tiny.encode_text(["a red cat"], long=long))
    assert tiny.cond_stage_model.tokenize_long("a red cat").shape == (1, 1, 77)


def test_clip_skip_2_is_diffusers_clip_skip_1(tmp_path) -> None:
    """The web UIs' count (README): clip_skip=2 conditions on the penultimate layer, then the final LayerNorm, which
    is diffusers' ``clip_skip=1`` (``final_layer_norm(hidden_states[-(clip_skip + 1)])`` in ``encode_prompt``)."""
    from ldm.addons import set_clip_skip
    from ldm.convert import export_diffusers

    model = _tiny_model("v1")
    export_diffusers(model, tmp_path / "sd")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "sd", local_files_only=True)
    prompts = ["a red cat, sitting", ""]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    te = pipe.text_encoder
    with torch.no_grad():
        out = te(ids, output_hidden_states=True)
        theirs = getattr(te, "text_model", te).final_layer_norm(out.hidden_states[-2])
        ours_1 = model.encode_text(prompts)
        set_clip_skip(model, 2)
        ours_2 = model.encode_text(prompts)
    assert (ours_1 - out[0]).abs().max().item() < 1e-5  # clip_skip=1: the last layer, diffusers' default
    assert (ours_2 - theirs).abs().max().item() < 1e-5 and (ours_2 - ours_1).abs().max().item() > 1e-2


@pytest.fixture(scope="module")
def sd1():
    """SD 1's text encoder settings (HF layout, padded with end-of-text), as transformers' CLIPTokenizer pads."""
    return _tiny_model("v1").cond_stage_model


@pytest.mark.parametrize("n", [0, 74, 75, 76, 77, 80])
def test_prompts_of_75_tokens_and_around_match_clip_tokenizer(sd1, tmp_path, n) -> None:
    tok = _hf_clip_tokenizer(tmp_path)
    prompt = " ".join(["cat"] * n)
    ours = sd1.tokenize([prompt])
    hf = tok([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ours, hf)
    long = sd1.tokenize_long([prompt])
    assert long.shape[1] == (2 if n > 75 else 1) and torch.equal(long[:, 0], ours)


SPECIAL = ["a <|endoftext|> b", "<|startoftext|>cat", "a <end_of_text> b, <start_of_text>"]


def test_special_token_names_are_read_as_each_reference_tokenizer_reads_them(sd1, tiny, tmp_path) -> None:
    """SD 1's tokenizer (transformers') knows "<|endoftext|>", SD 2's (open_clip's) "<end_of_text>"; the other
    spelling is text."""
    import open_clip

    hf = _hf_clip_tokenizer(tmp_path)(SPECIAL, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(sd1.tokenize(SPECIAL), hf)
    assert torch.equal(tiny.cond_stage_model.tokenize(SPECIAL), open_clip.get_tokenizer("ViT-H-14")(SPECIAL))


@pytest.mark.parametrize("n", [0, 75, 76, 80])
def test_sd2_prompts_match_open_clip_tokenizer(tiny, n) -> None:
    import open_clip

    prompt = " ".join(["café"] * n) + " 日本 🐱"[: 6 if n else 0]
    enc = tiny.cond_stage_model  # SD 2's settings: padded with 0 after end-of-text
    assert torch.equal(enc.tokenize([prompt]), open_clip.get_tokenizer("ViT-H-14")([prompt]))


def test_non_ascii_prompts_match_clip_tokenizer(sd1, tmp_path) -> None:
    tok = _hf_clip_tokenizer(tmp_path)
    prompts = ["café crème brûlée", "日本語の猫", "🐱 emoji 👍🏽", "İstanbul straße", "naïve résumé, ÉCOLE"]
    hf = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(sd1.tokenize(prompts), hf)


def test_a_long_negative_prompt_with_a_short_prompt(tiny) -> None:
    long = ", ".join(f"ugly{i}" for i in range(60))  # > 75 tokens
    enc = tiny.cond_stage_model
    kw = dict(steps=2, seed=0, output="latent", progress=False)
    z = tiny.generate(["a red cat"], negative_prompts=[long], long_prompts=True, **kw)
    assert torch.isfinite(z).all()
    c = tiny.encode_text(["a red cat", long], long=True)  # as generate encodes both branches: one batch
    k = enc.tokenize_long([long]).shape[1]
    assert k >= 2 and c.shape[1] == 77 * k
    empty = enc.encode_tokens(enc.tokenize_long(["a red cat", long])[:1, 1])  # the prompt's filler: an empty chunk
    torch.testing.assert_close(c[:1, 77:154], empty)
    torch.testing.assert_close(empty, tiny.encode_text([""]))  # the web UI pads with the empty prompt's context
