"""Export effects: what diffusers (from_pretrained, from_single_file) reads from our exports, and how re-exports,
failures and bad input behave. Tiny random models; diffusers and transformers are the references."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline
from safetensors.torch import load_file, save_file
from test_convert_diffusers import _assert_same, _tiny_config, _tiny_model

import ldm
import ldm.convert.diffusers_folder as folder_module
from ldm.checkpoint import CheckpointError, ema_key
from ldm.convert import export_diffusers, import_diffusers
from ldm.convert.diffusers_folder import scheduler_config
from ldm.loading import build
from script_loader import load_script

UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"


def _script():
    return load_script("convert")


def _pipe(path: Path, **kwargs) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(path, local_files_only=True, **kwargs)


def _unet_ldm(model) -> dict[str, torch.Tensor]:
    return {k[len("model.diffusion_model."):]: v for k, v in model.state_dict().items()
            if k.startswith("model.diffusion_model.")}


# ------------------------------------------------------------------------------------------------ fixes
def test_reexport_over_a_sharded_save_is_what_diffusers_loads(tmp_path) -> None:
    """diffusers reads a sharded index before the single file: shards of an earlier save_pretrained in the folder
    were loaded instead of the new export (silently other weights). They are removed now."""
    model = _tiny_model("v1")
    export_diffusers(model, tmp_path)
    old = _pipe(tmp_path)
    with torch.no_grad():
        for p in (*old.unet.parameters(), *old.text_encoder.parameters()):
            p.add_(1.0)
    old.save_pretrained(tmp_path, max_shard_size="100KB")  # shards + index in unet/ and text_encoder/
    assert list((tmp_path / "unet").glob("*.index.json"))
    export_diffusers(model, tmp_path)
    pipe = _pipe(tmp_path)
    assert torch.equal(pipe.unet.conv_in.weight, model.state_dict()[UNET_IN])
    ours_text = model.state_dict()["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, ours_text)
    assert sorted(p.name for p in (tmp_path / "unet").iterdir()) == ["config.json",
                                                                     "diffusion_pytorch_model.safetensors"]
    assert not (tmp_path / "tokenizer" / "tokenizer.json").exists()
    back = import_diffusers(tmp_path).state_dict()
    assert all(torch.equal(v, back[k]) for k, v in model.state_dict().items())


def test_failed_reexport_leaves_no_loadable_mix(tmp_path, monkeypatch) -> None:
    """An export into an earlier export's folder that fails after writing the U-Net left the old model_index.json:
    a loadable folder with the new U-Net and the old VAE. Now the folder does not load until an export completes."""
    first, second = _tiny_model("v1"), _tiny_model("v1")
    with torch.no_grad():
        for p in second.parameters():
            p.add_(1.0)
    export_diffusers(first, tmp_path)
    real, calls = folder_module.save_safetensors, []

    def fail_second(sd, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(f"{path}: no space left on device")
        return real(sd, path, metadata)

    monkeypatch.setattr(folder_module, "save_safetensors", fail_second)
    with pytest.raises(OSError, match="no space left"):
        export_diffusers(second, tmp_path)
    assert not (tmp_path / "model_index.json").exists()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        import_diffusers(tmp_path)
    with pytest.raises(Exception):  # noqa: B017 (diffusers' own error type)
        _pipe(tmp_path)
    monkeypatch.setattr(folder_module, "save_safetensors", real)
    export_diffusers(second, tmp_path)
    back = import_diffusers(tmp_path).state_dict()
    assert all(torch.equal(v, back[k]) for k, v in second.state_dict().items())


def test_truncated_or_foreign_weights_name_the_file(tmp_path) -> None:
    export_diffusers(_tiny_model("v1"), tmp_path / "sd")
    vae_file = tmp_path / "sd" / "vae" / "diffusion_pytorch_model.safetensors"
    data = vae_file.read_bytes()
    vae_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"vae/diffusion_pytorch_model.safetensors: not a valid safetensors"):
        import_diffusers(tmp_path / "sd")
    # the script ends with exit status 2 and one line (was: safetensors' exception escaped main)
    assert _script().main(["from-diffusers", str(tmp_path / "sd"), str(tmp_path / "x.safetensors")]) == 2
    assert not (tmp_path / "x.safetensors").exists()

    vae_file.write_bytes(data)
    unet_file = tmp_path / "sd" / "unet" / "diffusion_pytorch_model.safetensors"
    unet = load_file(str(unet_file))
    unet["down_blocks.9.resnets.0.conv1.weight"] = torch.zeros(1)
    save_file(unet, str(unet_file))
    with pytest.raises(KeyError, match=r"unet/diffusion_pytorch_model.safetensors: U-Net .*down_blocks\.9"):
        import_diffusers(tmp_path / "sd")

    with pytest.raises(NotADirectoryError, match="is a file, not a diffusers pipeline folder"):
        import_diffusers(unet_file)


def test_scaling_factor_written_as_configured(tmp_path) -> None:
    """vae/config.json held float32's 0.18215000629425049 for 0.18215 (and 0.30000001192 for 0.3)."""
    cfg = _tiny_config("v1")
    cfg["model"]["params"]["scale_factor"] = 0.18215
    model = build(cfg).eval()
    export_diffusers(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "vae" / "config.json").read_text())["scaling_factor"] == 0.18215
    model.first_stage_model.scale_factor.fill_(0.25)  # a buffer set apart from the config (scale_by_std) wins
    export_diffusers(model, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "vae" / "config.json").read_text())["scaling_factor"] == 0.25
    assert import_diffusers(tmp_path / "a").config.model.params.scale_factor == 0.18215


def test_to_diffusers_names_a_file_of_unknown_architecture(tmp_path, caplog) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2)}, str(path))
    with caplog.at_level(logging.ERROR, logger="convert"):
        assert _script().main(["to-diffusers", str(path), str(tmp_path / "d")]) == 2
    assert f"{path}: not a Stable Diffusion checkpoint" in caplog.text
    assert not (tmp_path / "d").exists()


def test_to_diffusers_ema_choice(tmp_path, caplog) -> None:
    """Raw weights by default, with a notice that the file has EMA weights (was silent); --ema exports them."""
    model = _tiny_model("v1")
    ema = {ema_key(n): p.detach() + 0.5 for n, p in model.model.named_parameters()}
    ldm.save(model, tmp_path / "m.safetensors", ema_state=ema)
    script = _script()
    with caplog.at_level(logging.INFO):
        assert script.main(["to-diffusers", str(tmp_path / "m.safetensors"), str(tmp_path / "raw")]) == 0
    assert f"not the file's {len(ema)} EMA weights" in caplog.text and "--ema" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert script.main(["to-diffusers", str(tmp_path / "m.safetensors"), str(tmp_path / "ema"), "--ema"]) == 0
    assert "EMA weights (use_ema" not in caplog.text
    raw = load_file(str(tmp_path / "raw" / "unet" / "diffusion_pytorch_model.safetensors"))
    averaged = load_file(str(tmp_path / "ema" / "unet" / "diffusion_pytorch_model.safetensors"))
    w = model.state_dict()[UNET_IN]
    assert torch.equal(raw["conv_in.weight"], w) and torch.equal(averaged["conv_in.weight"], w + 0.5)
    assert len(raw) == len(averaged) == len(_unet_ldm(model))


def test_attached_lora_is_exported_merged(tmp_path, caplog) -> None:
    """An unmerged LoRA was written as lora_A/lora_B beside diffusers' Linear weights: diffusers dropped them and ran
    the base U-Net (our import refused the folder). The export now holds the merged weights; the model keeps its
    adapters. Textual-inversion vectors, which the folder cannot hold, are named in a warning."""
    from ldm.lora import LoRALinear, add_lora

    model = _tiny_model("v1")
    add_lora(model.model, rank=2, alpha=4.0, targets=["to_q", "attn2.to_v"])
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)
    model.cond_stage_model.add_embedding("<thing>", torch.randn(2, model.cond_stage_model.width))
    with caplog.at_level(logging.WARNING):
        export_diffusers(model, tmp_path)
    assert not [k for k in load_file(str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")) if "lora" in k]
    assert any(isinstance(m, LoRALinear) for m in model.modules())
    pipe = _pipe(tmp_path)
    torch.manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.randn(2, 77, 32)
    with torch.no_grad():
        assert (model.unet(x, t, context=ctx) - pipe.unet(x, t, encoder_hidden_states=ctx).sample).abs().max() < 1e-4
    import_diffusers(tmp_path)  # loads strictly
    assert "<thing>" in caplog.text and "load_textual_inversion" in caplog.text


# ------------------------------------------------------------------------------------------ verified behaviour
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_single_file_equals_folder_in_diffusers(version: str, tmp_path) -> None:
    """diffusers' own single-file conversion of ldm.save's file gives the weights of our diffusers folder, and the
    folder's networks compute what ours do (U-Net, VAE encode/decode, text encoder), fp32."""
    model = _tiny_model(version)
    export_diffusers(model, tmp_path / "sd")
    ldm.save(model, tmp_path / "m.safetensors")
    folder = _pipe(tmp_path / "sd")
    single = StableDiffusionPipeline.from_single_file(str(tmp_path / "m.safetensors"), config=str(tmp_path / "sd"),
                                                      local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        _assert_same(dict(getattr(folder, name).state_dict()), dict(getattr(single, name).state_dict()))
    assert dict(folder.scheduler.config) == dict(single.scheduler.config)

    torch.manual_seed(0)
    x, z, t = torch.randn(2, 3, 32, 32), torch.randn(2, 4, 8, 8), torch.tensor([3, 900])
    ctx = torch.randn(2, 77, folder.unet.config.cross_attention_dim)
    ids = model.cond_stage_model.tokenize(["a red cube", ""])
    with torch.no_grad():
        assert (model.unet(z, t, context=ctx) - folder.unet(z, t, encoder_hidden_states=ctx).sample).abs().max() < 1e-4
        ours, theirs = model.first_stage_model.encode(x), folder.vae.encode(x).latent_dist
        assert (ours.mean - theirs.mean).abs().max() < 1e-4 and (ours.logvar - theirs.logvar).abs().max() < 1e-4
        assert (model.first_stage_model.decode(z) - folder.vae.decode(z).sample).abs().max() < 1e-4
        enc = model.cond_stage_model.encode_tokens(ids)
        assert (enc - folder.text_encoder(ids)[0]).abs().max() < 1e-4
    assert folder.vae.config.scaling_factor == model.config.model.params.scale_factor


@pytest.mark.parametrize("kind,zero_snr", [("linear", False), ("linear_plain", False), ("cosine", False),
                                           ("linear", True)])
def test_scheduler_config_gives_our_schedule(kind: str, zero_snr: bool) -> None:
    cfg = _tiny_config("v2")
    cfg["model"]["params"].update(beta_schedule=kind, zero_terminal_snr=zero_snr)
    model = build(cfg)
    sched = scheduler_config(cfg["model"]["params"])
    theirs = DDIMScheduler.from_config(sched)
    assert (theirs.alphas_cumprod.double() - model.alphas_cumprod.cpu()).abs().max() < 1e-6
    assert (sched["prediction_type"], sched["steps_offset"], sched["clip_sample"]) == ("v_prediction", 1, False)
    assert sched["timestep_spacing"] == ("trailing" if zero_snr else "leading")
    with pytest.raises(NotImplementedError, match="beta_schedule='sqrt'"):
        scheduler_config(dict(cfg["model"]["params"], beta_schedule="sqrt"))


def test_inpainting_unet_exports_as_inpaint_pipeline(tmp_path) -> None:
    cfg = _tiny_config("v1")
    cfg["model"]["params"]["unet_config"]["params"]["in_channels"] = 9
    cfg["model"]["params"]["conditioning_key"] = "hybrid"
    model = build(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    export_diffusers(model, tmp_path)
    pipe = StableDiffusionInpaintPipeline.from_pretrained(tmp_path, local_files_only=True)
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "StableDiffusionInpaintPipeline"
    x, t, ctx = torch.randn(1, 9, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        assert (model.unet(x, t, context=ctx) - pipe.unet(x, t, encoder_hidden_states=ctx).sample).abs().max() < 1e-4
    back = import_diffusers(tmp_path)
    assert back.conditioning_key == "hybrid"
    _assert_same(dict(back.state_dict()), dict(model.state_dict()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_export(dtype: torch.dtype, tmp_path) -> None:
    model = _tiny_model("v1").to(dtype=dtype)
    export_diffusers(model, tmp_path)
    for name, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        assert {v.dtype for v in load_file(str(tmp_path / name / f"{stem}.safetensors")).values()} == {dtype}
    pipe = _pipe(tmp_path, dtype=dtype)
    assert torch.equal(pipe.unet.conv_in.weight, model.state_dict()[UNET_IN])
    assert pipe.vae.config.scaling_factor == 0.3
    back = import_diffusers(tmp_path, dtype=dtype)
    _assert_same(dict(back.state_dict()), dict(model.state_dict()))


# ---------------------------------------------------------------------------------- SD 2 depth (512-depth-ema)
MIDAS_KEYS = {"depth_model.model.pretrained.model.patch_embed.backbone.stem.conv.weight": (64, 3, 7, 7),
              "depth_model.model.scratch.output_conv.4.bias": (1,)}  # two of the original file's MiDaS keys


def _depth_config() -> dict:
    """A tiny SD 2 depth model: U-Net in_channels 5 (4 latent + 1 depth), hybrid conditioning, ε."""
    cfg = _tiny_config("v2")
    cfg["model"]["params"].update(conditioning_key="hybrid", parameterization="eps")
    cfg["model"]["params"]["unet_config"]["params"]["in_channels"] = 5
    return cfg


def _depth_model():
    model = build(_depth_config()).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _unet_keys(sd) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if k.startswith(("model.diffusion_model.", "first_stage_model."))}


def test_original_depth_checkpoint_converts_to_a_depth2img_folder(tmp_path, caplog) -> None:
    """An original depth file (no config of ours, a sidecar YAML, the MiDaS ``depth_model.*`` beside the SD keys)
    was refused as not fitting the model ("wrong config?"), and a 5-channel U-Net was exported as a
    StableDiffusionPipeline that failed on its first step (5-channel latents against a 4-channel prediction). The
    U-Net, autoencoder and text encoder convert now, the estimator's keys are named as not loaded, and the folder is
    diffusers' depth pipeline."""
    from diffusers import StableDiffusionDepth2ImgPipeline

    model = _depth_model()
    sd = {**model.state_dict(), **{k: torch.zeros(s) for k, s in MIDAS_KEYS.items()}}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "depth.safetensors"))
    (tmp_path / "depth.yaml").write_text(json.dumps(_depth_config()), encoding="utf-8")  # JSON is YAML
    with caplog.at_level(logging.INFO):
        assert _script().main(["to-diffusers", str(tmp_path / "depth.safetensors"), str(tmp_path / "d")]) == 0
    assert "ignored 2 keys of the MiDaS depth estimator (depth_model.*)" in caplog.text
    assert "exported as StableDiffusionDepth2ImgPipeline without its depth estimator" in caplog.text
    index = json.loads((tmp_path / "d" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionDepth2ImgPipeline" and index["depth_estimator"] == [None, None]
    assert "safety_checker" not in index
    pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(tmp_path / "d", local_files_only=True,
                                                            depth_estimator=None, feature_extractor=None)
    assert pipe.unet.config.in_channels == 5
    x, t, ctx = torch.randn(1, 5, 8, 8), torch.tensor([500]), torch.randn(1, 77, 64)
    with torch.no_grad():
        assert (model.unet(x, t, context=ctx) - pipe.unet(x, t, encoder_hidden_states=ctx).sample).abs().max() < 1e-4
        out = pipe("a", image=torch.rand(1, 3, 64, 64), depth_map=torch.rand(1, 32, 32), num_inference_steps=2,
                   output_type="latent").images
    assert out.shape == (1, 4, 32, 32) and torch.isfinite(out).all()  # the tiny autoencoder downsamples by 2
    back = import_diffusers(tmp_path / "d")
    assert back.conditioning_key == "hybrid" and back.config.model.params.unet_config.params.in_channels == 5
    _assert_same(_unet_keys(back.state_dict()), _unet_keys(model.state_dict()))


def test_importing_a_depth_folder_names_the_depth_estimator_it_leaves_out(tmp_path, caplog) -> None:
    """diffusers' stabilityai/stable-diffusion-2-depth lists a DPT depth_estimator: the import dropped it silently."""
    export_diffusers(_depth_model(), tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionDepth2ImgPipeline"  # was StableDiffusionPipeline
    index.update(depth_estimator=["transformers", "DPTForDepthEstimation"],
                 feature_extractor=["transformers", "DPTImageProcessor"])
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with caplog.at_level(logging.WARNING, logger="ldm.convert.diffusers_folder"):
        import_diffusers(tmp_path)
    assert "StableDiffusionDepth2ImgPipeline component(s) depth_estimator not imported (the depth model" in caplog.text


def test_a_unet_no_diffusers_pipeline_takes_is_refused(tmp_path) -> None:
    """A U-Net with 7 input channels (4 latent + 3 image, the x4 upscaler's) was written as a StableDiffusionPipeline
    that failed at its first step; the export refuses it before writing anything."""
    cfg = _tiny_config("v1")
    cfg["model"]["params"]["unet_config"]["params"]["in_channels"] = 7
    cfg["model"]["params"]["conditioning_key"] = "hybrid"
    with pytest.raises(NotImplementedError, match=r"in_channels=7 with out_channels=4 fits no diffusers"):
        export_diffusers(build(cfg), tmp_path / "x")
    assert not (tmp_path / "x").exists()
