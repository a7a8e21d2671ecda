"""ldm ⇄ diffusers conversion, checked against diffusers' own single-file converter and diffusers' models."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL as DAutoencoderKL  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)

import ldm
from ldm.autoencoder.model import AutoencoderKL  # noqa: E402
from ldm.convert.diffusers_unet import (  # noqa: E402
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    unet_diffusers_to_ldm,
    unet_ldm_to_diffusers,
)
from ldm.convert.diffusers_vae import (  # noqa: E402
    vae_config_from_diffusers,
    vae_config_to_diffusers,
    vae_diffusers_to_ldm,
    vae_ldm_to_diffusers,
)
from ldm.unet.model import UNetModel  # noqa: E402
from script_loader import load_script

UNET_V1 = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2, 1],
               num_res_blocks=2, channel_mult=[1, 2, 2, 2], num_heads=2, use_spatial_transformer=True,
               transformer_depth=1, context_dim=32, legacy=False)
UNET_V2 = dict({k: v for k, v in UNET_V1.items() if k != "num_heads"}, num_head_channels=16,
               use_linear_in_transformer=True, context_dim=64)
UNET_ADM = dict(UNET_V2, num_res_blocks=1, attention_resolutions=[2], num_classes="sequential", adm_in_channels=24)
SD_V1_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                  num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                  transformer_depth=1, context_dim=768, use_checkpoint=True, legacy=False)
SD_V2_UNET = dict({k: v for k, v in SD_V1_UNET.items() if k != "num_heads"}, num_head_channels=64,
                  use_linear_in_transformer=True, context_dim=1024)
DDCONFIG = dict(double_z=True, z_channels=4, resolution=64, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2],
                num_res_blocks=1, attn_resolutions=[], dropout=0.0)
SD_DDCONFIG = dict(DDCONFIG, resolution=256, ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2)


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere (zero-initialized output convs would hide mapping errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module.eval()


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b), f"only in 1st: {sorted(set(a) - set(b))[:5]}, only in 2nd: {sorted(set(b) - set(a))[:5]}"
    bad = [k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:5]}"


@pytest.mark.parametrize("params", [UNET_V1, UNET_V2, UNET_ADM], ids=["v1", "v2", "adm"])
def test_unet_matches_diffusers(params: dict) -> None:
    ours = _randomize(UNetModel(**params), 0)
    sd = ours.state_dict()
    cfg = unet_config_to_diffusers(params)
    converted = unet_ldm_to_diffusers(sd, params)
    reference = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in sd.items()}, cfg)
    _assert_same(converted, reference)
    _assert_same(unet_diffusers_to_ldm(converted, params), sd)  # exact round trip

    theirs = UNet2DConditionModel.from_config(cfg).eval()
    theirs.load_state_dict(converted, strict=True)
    torch.manual_seed(1)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10.0, 700.0])
    ctx = torch.randn(2, 5, params["context_dim"])
    y = torch.randn(2, params["adm_in_channels"]) if "adm_in_channels" in params else None
    with torch.no_grad():
        a = ours(x, t, context=ctx, y=y)
        b = theirs(x, t, encoder_hidden_states=ctx, class_labels=y).sample
    assert (a - b).abs().max().item() < 1e-4


def test_unet_config_round_trip() -> None:
    for params in (SD_V1_UNET, SD_V2_UNET, UNET_ADM):
        cfg = unet_config_to_diffusers(params)
        back = unet_config_from_diffusers(cfg)
        assert unet_config_to_diffusers(back) == cfg
    assert unet_config_to_diffusers(SD_V1_UNET)["attention_head_dim"] == 8
    assert unet_config_to_diffusers(SD_V2_UNET)["attention_head_dim"] == [5, 10, 20, 20]


@pytest.mark.parametrize("params", [SD_V1_UNET, SD_V2_UNET], ids=["sd-v1", "sd-v2"])
def test_full_size_unet_keys(params: dict) -> None:
    """Full-size SD U-Net key sets (meta tensors: shapes only) convert with nothing left over."""
    with torch.device("meta"):
        ours = UNetModel(**params)
        theirs = UNet2DConditionModel(**{k: v for k, v in unet_config_to_diffusers(params).items()
                                         if not k.startswith("_")})
    sd = ours.state_dict()
    converted = unet_ldm_to_diffusers(sd, params)
    expected = theirs.state_dict()
    assert set(converted) == set(expected)
    assert all(converted[k].shape == expected[k].shape for k in expected)
    assert set(unet_diffusers_to_ldm(expected, params)) == set(sd)


def test_unet_wrong_config_names_keys() -> None:
    sd = UNetModel(**UNET_V1).state_dict()
    with pytest.raises(KeyError, match="fit no module"):
        unet_ldm_to_diffusers(sd, dict(UNET_V1, num_res_blocks=1))
    with pytest.raises(NotImplementedError, match="resblock_updown"):
        unet_config_to_diffusers(dict(UNET_V1, resblock_updown=True))
    with pytest.raises(NotImplementedError, match="act_fn"):
        unet_config_from_diffusers(dict(unet_config_to_diffusers(UNET_V1), act_fn="gelu"))


def test_vae_matches_diffusers() -> None:
    ours = _randomize(AutoencoderKL(ddconfig=DDCONFIG, embed_dim=4), 2)
    sd = ours.state_dict()
    cfg = vae_config_to_diffusers(DDCONFIG, 4, scaling_factor=0.5)
    converted = vae_ldm_to_diffusers(sd, DDCONFIG)
    reference = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in sd.items()}, cfg)
    _assert_same(converted, reference)
    assert converted["encoder.mid_block.attentions.0.to_q.weight"].shape == (64, 64)
    _assert_same(vae_diffusers_to_ldm(converted, DDCONFIG), sd)
    # pre-0.14 diffusers attention names are read too
    old = {k.replace(".to_q.", ".query.").replace(".to_out.0.", ".proj_attn."): v for k, v in converted.items()}
    _assert_same(vae_diffusers_to_ldm(old, DDCONFIG), sd)

    theirs = DAutoencoderKL.from_config(cfg).eval()
    theirs.load_state_dict(converted, strict=True)
    torch.manual_seed(3)
    x, z = torch.randn(1, 3, 32, 32), torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        post_a, post_b = ours.encode(x), theirs.encode(x).latent_dist
        assert (post_a.mean - post_b.mean).abs().max().item() < 1e-4
        assert (post_a.logvar - post_b.logvar).abs().max().item() < 1e-4
        assert (ours.decode(z) - theirs.decode(z).sample).abs().max().item() < 1e-4
    back = vae_config_from_diffusers(cfg)
    assert back["ddconfig"] == DDCONFIG and back["embed_dim"] == 4 and back["scale_factor"] == 0.5


def test_full_size_vae_keys() -> None:
    with torch.device("meta"):
        ours = AutoencoderKL(ddconfig=SD_DDCONFIG, embed_dim=4)
        cfg = vae_config_to_diffusers(SD_DDCONFIG, 4, scaling_factor=0.18215)
        theirs = DAutoencoderKL(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    converted = vae_ldm_to_diffusers(ours.state_dict(), SD_DDCONFIG)
    expected = theirs.state_dict()
    assert set(converted) == set(expected)
    assert all(converted[k].shape == expected[k].shape for k in expected)


def test_vae_unsupported_config() -> None:
    with pytest.raises(NotImplementedError, match="attn_resolutions"):
        vae_config_to_diffusers(dict(DDCONFIG, attn_resolutions=[16]), 4, 0.18215)
    with pytest.raises(NotImplementedError, match="embed_dim"):
        vae_config_to_diffusers(DDCONFIG, 3, 0.18215)


# ------------------------------------------------------------------------------------------ text encoder, folders
def _tiny_config(version: str) -> dict:
    unet = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2],
                num_res_blocks=1, channel_mult=[1, 2, 2], use_spatial_transformer=True, transformer_depth=1,
                legacy=False)
    if version == "v1":
        unet.update(num_heads=2, context_dim=32)
        text = {"arch": None, "text_cfg": dict(width=32, heads=2, layers=2), "layer": "last", "layout": "hf",
                "pad_token": 49407, "quick_gelu": True}
    else:
        unet.update(num_head_channels=16, context_dim=64, use_linear_in_transformer=True)
        text = {"arch": None, "text_cfg": dict(width=64, heads=4, layers=3), "layer": "penultimate",
                "layout": "open_clip", "pad_token": 0}
    dd = dict(double_z=True, z_channels=4, resolution=64, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
              num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    return {"model": {"target": "LatentDiffusion", "params": {
        "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "image_size": 8,
        "parameterization": "eps" if version == "v1" else "v", "scale_factor": 0.3, "conditioning_key": "crossattn",
        "unet_config": {"target": "UNetModel", "params": unet},
        "first_stage_config": {"target": "AutoencoderKL", "params": {"embed_dim": 4, "ddconfig": dd}},
        "cond_stage_config": {"target": "OpenCLIPTextEncoder", "params": text}}}}


def _tiny_model(version: str):
    from ldm.loading import build

    model = build(_tiny_config(version))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


# the documented loss of SD v2 text encoders: unused last layer, text_projection, logit_scale
def _unused(k: str) -> bool:
    return k.startswith(("cond_stage_model.model.transformer.resblocks.2.", "cond_stage_model.model.text_projection",
                         "cond_stage_model.model.logit_scale"))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_export_loads_in_diffusers_and_imports_back(version: str, tmp_path) -> None:
    from diffusers import StableDiffusionPipeline

    from ldm.convert import export_diffusers, import_diffusers

    model = _tiny_model(version)
    export_diffusers(model, tmp_path / "sd")
    index = json.loads((tmp_path / "sd" / "model_index.json").read_text())
    assert index["requires_safety_checker"] is False and index["safety_checker"] == [None, None]
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "sd", local_files_only=True)
    pred = "epsilon" if version == "v1" else "v_prediction"
    assert pipe.scheduler.config.prediction_type == pred and pipe.vae.config.scaling_factor == pytest.approx(0.3)

    # every diffusers weight came from the folder (nothing left at its initialisation)
    sd = model.state_dict()
    unet_ref = unet_ldm_to_diffusers({k[22:]: v for k, v in sd.items() if k.startswith("model.diffusion_model.")},
                                     model.config.model.params.unet_config.params)
    _assert_same(dict(pipe.unet.state_dict()), unet_ref)
    # tokenizer and text encoder: diffusers' CLIPTokenizer + CLIPTextModel give our context
    prompts = ["a photograph of an astronaut riding a horse", "Ünïcode, commas; and 123 digits"]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    enc = model.cond_stage_model
    assert torch.equal(ids, enc.tokenize(prompts))
    with torch.no_grad():
        theirs = pipe.text_encoder(ids)[0]
        ours = enc.encode_tokens(ids)
    assert (theirs - ours).abs().max().item() < 1e-4

    back = import_diffusers(tmp_path / "sd")
    via_load = ldm.load(tmp_path / "sd")  # ldm.load routes a diffusers folder to import_diffusers
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), via_load.state_dict().values()))
    b = back.state_dict()
    assert set(b) == set(sd)
    differ = [k for k in sd if not torch.equal(sd[k], b[k])]
    assert all(_unused(k) for k in differ), differ[:5]
    assert bool(differ) == (version == "v2")
    assert back.parameterization == model.parameterization
    assert float(back.first_stage_model.scale_factor) == pytest.approx(0.3)

    # a folder written by diffusers itself (transformers >= 5.6 writes CLIPTextModel keys without "text_model.")
    pipe.save_pretrained(tmp_path / "saved")
    again = import_diffusers(tmp_path / "saved").state_dict()
    assert all(torch.equal(b[k], again[k]) for k in b)


def test_open_clip_text_matches_diffusers_converter() -> None:
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.convert.diffusers_text import text_config_to_hf, text_encoder_to_hf

    enc = _tiny_model("v2").cond_stage_model
    sd = enc.state_dict()
    ours = text_encoder_to_hf(sd, "open_clip", enc.num_layers, "last")  # keep all layers, as diffusers does here
    cfg = text_config_to_hf(enc)
    hf_model = CLIPTextModel(CLIPTextConfig(**dict(cfg, num_hidden_layers=enc.num_layers)))
    theirs = convert_open_clip_checkpoint(hf_model, {"cond_stage_model." + k: v for k, v in sd.items()})
    _assert_same(ours, theirs)


def test_standard_text_encoders_round_trip_config() -> None:
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.conditioning.text_encoder import (
        frozen_clip_embedder,
        frozen_open_clip_embedder,
    )
    from ldm.convert.diffusers_text import (
        text_config_to_hf,
        text_encoder_to_hf,
        text_encoder_yaml,
    )

    with torch.device("meta"):
        v1 = frozen_clip_embedder()
        v2 = frozen_open_clip_embedder(layer="penultimate")
    c1, c2 = text_config_to_hf(v1), text_config_to_hf(v2)
    assert (c1["num_hidden_layers"], c1["hidden_act"], c1["pad_token_id"]) == (12, "quick_gelu", 49407)
    assert (c2["num_hidden_layers"], c2["hidden_act"], c2["num_attention_heads"]) == (23, "gelu", 16)
    for enc, cfg in ((v1, c1), (v2, c2)):  # full-size key sets and shapes match transformers' CLIPTextModel
        hf = text_encoder_to_hf(enc.state_dict(), enc.layout, enc.num_layers, enc.layer)
        with torch.device("meta"):
            ref = CLIPTextModel(CLIPTextConfig(**cfg)).state_dict()
        ref = {k: v for k, v in ref.items() if not k.endswith("position_ids")}  # transformers < 4.31 kept it
        assert {k.removeprefix("text_model."): v.shape for k, v in hf.items()} == \
            {k.removeprefix("text_model."): v.shape for k, v in ref.items()}
    assert text_encoder_yaml(c1, 49407) == {"target": "FrozenCLIPEmbedder"}
    assert text_encoder_yaml(c2, 0)["target"] == "FrozenOpenCLIPEmbedder"


def test_import_errors(tmp_path) -> None:
    from ldm.convert import export_diffusers, import_diffusers

    with pytest.raises(FileNotFoundError, match="model_index.json"):
        import_diffusers(tmp_path)
    export_diffusers(_tiny_model("v1"), tmp_path / "sd")
    (tmp_path / "sd" / "unet" / "diffusion_pytorch_model.safetensors").rename(
        tmp_path / "sd" / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickled"):
        import_diffusers(tmp_path / "sd")


def test_convert_script(tmp_path) -> None:

    from ldm.checkpoint import read_state_dict

    script = load_script("convert")
    model = _tiny_model("v1")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"state_dict": sd, "global_step": 3}, tmp_path / "m.ckpt")
    assert script.main(["to-safetensors", str(tmp_path / "m.ckpt"), str(tmp_path / "m.safetensors")]) == 0
    _assert_same(read_state_dict(tmp_path / "m.safetensors")[0], sd)
    cfg_path = tmp_path / "tiny.yaml"
    from omegaconf import OmegaConf

    OmegaConf.save(OmegaConf.create(_tiny_config("v1")), cfg_path)
    assert script.main(["to-diffusers", str(tmp_path / "m.safetensors"), str(tmp_path / "d"),
                        "--config", str(cfg_path)]) == 0
    assert script.main(["from-diffusers", str(tmp_path / "d"), str(tmp_path / "back.safetensors")]) == 0
    _assert_same(read_state_dict(tmp_path / "back.safetensors")[0], sd)
    assert script.main(["from-diffusers", str(tmp_path / "nowhere"), str(tmp_path / "x.safetensors")]) == 2


@pytest.mark.parametrize("yaml", ["sd/v1-inference.yaml", "sd/v2-inference-v.yaml"])
def test_standard_sd_folder_configs_rebuild_the_same_model(yaml: str, tmp_path) -> None:
    """Full-size SD v1 / v2: the diffusers JSONs we write (and diffusers reads) rebuild the original architecture."""
    from ldm.config import load_config
    from ldm.convert.diffusers_folder import config_from_diffusers, diffusers_configs
    from ldm.loading import build

    with torch.device("meta"):
        model = build(load_config(yaml))
    for rel, obj in diffusers_configs(model).items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(json.dumps(obj))
    with torch.device("meta"):
        again = build(config_from_diffusers(tmp_path))
        theirs = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(tmp_path / "unet"))
    a, b = model.state_dict(), again.state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert again.parameterization == model.parameterization
    assert type(again.cond_stage_model) is type(model.cond_stage_model)
    assert (again.cond_stage_model.layer, again.cond_stage_model.pad_token) == (model.cond_stage_model.layer,
                                                                                 model.cond_stage_model.pad_token)
    assert again.config.model.params.cond_stage_config.target in ("FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder")
    unet = {k[22:]: v for k, v in a.items() if k.startswith("model.diffusion_model.")}
    converted = unet_ldm_to_diffusers(unet, model.config.model.params.unet_config.params)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in theirs.state_dict().items()}


@pytest.mark.parametrize("layout", ["learned_embeds", "embedding"])
def test_a_trained_words_files_load_in_diffusers_as_in_ldm(layout: str, tmp_path) -> None:
    """The textual-inversion export (ldm.diffusion.inversion.write_embedding) in both layouts: diffusers'
    load_textual_inversion reads it, and its CLIPTextModel gives the context ours gives with the same file."""
    from diffusers import StableDiffusionPipeline

    from ldm.conditioning.embeddings import read_embedding
    from ldm.convert import export_diffusers
    from ldm.diffusion.inversion import write_embedding

    model = _tiny_model("v1")
    export_diffusers(model, tmp_path / "sd")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "sd", local_files_only=True)
    enc = model.cond_stage_model
    vectors = torch.randn(3, enc.width, generator=torch.Generator().manual_seed(1)) * 0.1
    write_embedding(vectors, "<emo>", tmp_path / "ti" / "model.safetensors")
    path = tmp_path / "ti" / f"{layout}.safetensors"
    assert torch.equal(read_embedding(path, name="<emo>")[1], vectors)
    pipe.load_textual_inversion(str(path), token="<emo>")
    prompt = "a <emo> cat, flat"
    ids = pipe.tokenizer(pipe.maybe_convert_prompt(prompt, pipe.tokenizer), padding="max_length", max_length=77,
                         truncation=True, return_tensors="pt").input_ids
    enc.add_embedding(*read_embedding(path, name="<emo>"))
    assert torch.equal(ids, enc.tokenize([prompt]))  # the word's three ids after the vocabulary, in both
    with torch.no_grad():
        theirs = pipe.text_encoder(ids)[0]
        ours = enc([prompt])
    assert (theirs - ours).abs().max().item() < 1e-4
