"""Textual-inversion embeddings in the web UIs' and diffusers' formats, against diffusers' ``load_textual_inversion``
on the same exported text encoder: the same token ids (past the vocabulary) and the same context."""
from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

import ldm
from ldm.checkpoint import CheckpointError
from ldm.conditioning.embeddings import read_embedding, split_prompt
from ldm.convert import export_diffusers
from test_convert_diffusers import _tiny_model

diffusers = pytest.importorskip("diffusers", reason="diffusers is a dev dependency")  # missing: the install broke
PROMPTS = ["a photo of <cat-toy> on a beach", "<cat-toy>, <style> painting of <cat-toy>", "no embedding here"]


def _files(tmp_path, width: int) -> dict:
    g = torch.Generator().manual_seed(3)
    cat, style = torch.randn(3, width, generator=g), torch.randn(1, width, generator=g)
    webui = tmp_path / "cat.pt"  # the web UIs' .pt, multi-vector
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(cat)}, "name": "cat",
                "step": 3000}, webui)
    learned = tmp_path / "learned_embeds.safetensors"  # diffusers' format, one vector
    save_file({"<style>": style[0]}, learned)
    return {"cat": cat, "style": style, "webui": webui, "learned": learned}


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_embeddings_give_diffusers_context(version, tmp_path) -> None:
    model = _tiny_model(version)
    enc = model.cond_stage_model
    f = _files(tmp_path, enc.width)
    export_diffusers(model, tmp_path / "sd")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "sd", local_files_only=True)
    pipe.load_textual_inversion(str(f["webui"]), token="<cat-toy>")
    pipe.load_textual_inversion(str(f["learned"]))
    from ldm.addons import load_embeddings

    load_embeddings(model, {"<cat-toy>": f["webui"]})
    load_embeddings(model, f["learned"])  # named by the file itself: "<style>"
    assert set(enc.embeddings) == {"<cat-toy>", "<style>"}
    prompts = [pipe.maybe_convert_prompt(p, pipe.tokenizer) for p in PROMPTS]  # "<cat-toy>" → 3 tokens
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(enc.tokenize(PROMPTS), ids)
    with torch.no_grad():
        theirs = pipe.text_encoder(ids)[0]
        ours = model.encode_text(PROMPTS)
    assert (theirs - ours).abs().max().item() < 1e-4
    plain = _tiny_model(version).encode_text(PROMPTS[2:])
    torch.testing.assert_close(ours[2:], plain)  # a prompt without the names is unchanged


def test_formats_names_and_errors(tmp_path) -> None:
    f = _files(tmp_path, 32)
    name, v = read_embedding(f["webui"])
    assert name == "cat" and torch.equal(v, f["cat"])  # the web UIs name an embedding after its file
    save_file({"emb_params": f["cat"]}, tmp_path / "EasyNeg.safetensors")
    assert read_embedding(tmp_path / "EasyNeg.safetensors")[0] == "EasyNeg"
    assert read_embedding(f["learned"], name="other")[0] == "other"
    assert read_embedding(f["learned"])[0] == "<style>"  # diffusers' file names its own token
    assert split_prompt("a <c> and <cat>", ["<c>", "<cat>"]) == ["a ", "<c>", " and ", "<cat>"]
    # a word-like name: case-insensitive, never inside a longer word
    assert split_prompt("Cat, cats, concatenate, CAT.", ["cat"]) == ["Cat", ", cats, concatenate, ", "CAT", "."]
    assert split_prompt("very_neg, _neg", ["_neg"]) == ["very_neg, ", "_neg"]  # "_" is a word character too
    save_file({"*": f["cat"]}, tmp_path / "star.safetensors")  # a single-tensor file whose key is no "<token>"
    assert read_embedding(tmp_path / "star.safetensors")[0] == "star"
    save_file({"clip_l": f["cat"], "clip_g": f["cat"].clone()}, tmp_path / "xl.safetensors")
    with pytest.raises(CheckpointError, match="xl.safetensors: an SDXL embedding"):
        read_embedding(tmp_path / "xl.safetensors")
    torch.manual_seed(0)
    ckpt = ldm.save(ldm.load(config="configs/tiny/txt2img.yaml"), tmp_path / "tiny.safetensors")
    save_file({"emb_params": torch.zeros(2, 48)}, tmp_path / "wide.safetensors")
    with pytest.raises(CheckpointError, match=r"wide.safetensors: .*do not fit width 64"):
        ldm.load(ckpt, embeddings=tmp_path / "wide.safetensors")
    save_file({"emb_params": torch.zeros(2, 64)}, tmp_path / "neg.safetensors")
    (tmp_path / "b").mkdir()
    save_file({"emb_params": torch.ones(1, 64)}, tmp_path / "b" / "NEG.safetensors")
    with pytest.raises(CheckpointError, match="'NEG': a textual-inversion embedding of that name is already loaded"):
        ldm.load(ckpt, embeddings=[tmp_path / "neg.safetensors", tmp_path / "b" / "NEG.safetensors"])
    model = ldm.load(ckpt, embeddings=[tmp_path / "neg.safetensors", ("other", tmp_path / "b" / "NEG.safetensors")])
    assert set(model.cond_stage_model.embeddings) == {"neg", "other"}


def test_a_long_prompt_quotes_the_embedding_name_where_it_cut(tmp_path, caplog) -> None:
    torch.manual_seed(0)
    ckpt = ldm.save(ldm.load(config="configs/tiny/txt2img.yaml"), tmp_path / "tiny.safetensors")
    save_file({"emb_params": torch.randn(4, 64)}, tmp_path / "tok.safetensors")
    model = ldm.load(ckpt, embeddings=[tmp_path / "tok.safetensors"])
    with caplog.at_level(logging.WARNING):
        ids = model.cond_stage_model.tokenize(["cat " * 73 + "tok dog"])
    assert ids.shape == (1, 77) and "tokens: tok dog" in caplog.text  # the cut began inside "tok"
    images = model.generate(["tok, a red circle"], steps=2, seed=0, output="tensor", progress=False)
    assert torch.isfinite(images).all()
