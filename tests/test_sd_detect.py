"""Which config a checkpoint without one gets: SD v1/v2 from keys, ε or v from the weights, a sidecar YAML first."""
from __future__ import annotations

import logging

import pytest
import torch
from omegaconf import OmegaConf

import ldm
from ldm.checkpoint import V_PRED_PROBE, detect_variant, guess_v_prediction, save_safetensors
from ldm.loading import _config_for


def _sd_like(version: str, in_channels: int = 4, probe_std: float | None = None) -> dict[str, torch.Tensor]:
    """The keys and shapes detect_variant reads, as a released SD file has them."""
    ctx = 768 if version == "v1" else 1024
    sd = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, in_channels, 3, 3),
          "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, ctx)}
    text = ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" if version == "v1"
            else "cond_stage_model.model.token_embedding.weight")
    sd[text] = torch.zeros(8, ctx)
    if probe_std is not None:  # ±s alternating: population std exactly s
        sd[V_PRED_PROBE] = torch.tensor([probe_std, -probe_std] * 160)
    return sd


@pytest.mark.parametrize("version,in_ch,std,expected", [
    ("v2", 4, 0.12, "v"),      # a 768-px v-model
    ("v2", 4, 0.05, "eps"),    # the 512-px base
    ("v2", 9, 0.12, "eps"),    # inpainting models are ε whatever the statistic
    ("v2", 4, None, "eps"),    # no probe key: ε
    ("v1", 4, 0.12, "eps"),    # SD 1.x is ε
])
def test_parameterization_from_the_weights(version, in_ch, std, expected) -> None:
    variant = detect_variant(_sd_like(version, in_ch, std))
    assert variant["version"] == version and variant["in_channels"] == in_ch
    assert variant["parameterization"] == expected


def test_threshold_is_population_std() -> None:
    b = torch.tensor([0.0, 0.17])  # population std 0.085, sample std 0.120
    assert not guess_v_prediction({V_PRED_PROBE: b})
    assert guess_v_prediction({V_PRED_PROBE: b * 1.1})  # 0.0935
    assert guess_v_prediction({V_PRED_PROBE: (b * 1.1).half()})  # fp16 files


def test_v_model_gets_the_v_config(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="ldm.loading"):
        cfg = _config_for(_sd_like("v2", 4, 0.12), {})
    assert cfg.model.params.parameterization == "v" and "v2-inference-v.yaml" in caplog.text
    assert cfg.model.params.image_size == 96  # 768 px by default, as trained
    base = _config_for(_sd_like("v2", 4, 0.05), {})
    assert base.model.params.get("parameterization", "eps") == "eps" and base.model.params.image_size == 64
    inpaint = _config_for(_sd_like("v2", 9, 0.12), {})
    assert inpaint.model.params.unet_config.params.in_channels == 9
    assert inpaint.model.params.conditioning_key == "hybrid"
    assert inpaint.model.params.get("parameterization", "eps") == "eps"


def test_sidecar_yaml_beside_a_checkpoint_without_config(tmp_path, caplog, monkeypatch) -> None:
    import ldm.loading

    torch.manual_seed(0)
    model = ldm.load(config="configs/tiny/txt2img.yaml")
    path = tmp_path / "custom.safetensors"
    save_safetensors(model.state_dict(), path)  # no config in the metadata, as a released file

    def detected(sd, meta):
        raise RuntimeError("detection ran")

    monkeypatch.setattr(ldm.loading, "_config_for", detected)
    with pytest.raises(RuntimeError, match="detection ran"):
        ldm.load(path)  # no sidecar: the SD v1/v2 detection decides
    (tmp_path / "custom.yaml").write_text(open("configs/tiny/txt2img.yaml").read())
    with caplog.at_level(logging.INFO, logger="ldm.loading"):
        back = ldm.load(path)
    assert "custom.yaml" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))


def test_wrong_config_names_the_file_the_key_and_both_shapes(tmp_path) -> None:
    from ldm.checkpoint import CheckpointError

    path = tmp_path / "tiny.safetensors"
    save_safetensors(ldm.load(config="configs/tiny/txt2img.yaml").state_dict(), path)
    cfg = OmegaConf.load("configs/tiny/txt2img.yaml")
    cfg.model.params.unet_config.params.model_channels *= 2
    with pytest.raises(CheckpointError, match=r"tiny.safetensors: \d+ tensor\(s\) have other shapes.*in the file"):
        ldm.load(path, config=cfg)


@pytest.mark.parametrize("key, name", [
    ("conditioner.embedders.1.model.token_embedding.weight", "SDXL"),
    ("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "SD3"),
    ("double_blocks.0.img_attn.qkv.weight", "FLUX"),
])
def test_a_file_of_another_architecture_is_named_as_such(tmp_path, key, name):
    """An SDXL file (it has input_blocks.0.0 too) was refused as 'no text encoder keys and no cross-attention', which
    sent users looking for a broken download."""
    import ldm
    from ldm.checkpoint import CheckpointError

    sd = {key: torch.zeros(2, 2), "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}
    save_safetensors(sd, tmp_path / "foreign.safetensors")
    with pytest.raises(CheckpointError, match=rf"foreign.safetensors.*a {name} checkpoint, not Stable Diffusion"):
        ldm.load(tmp_path / "foreign.safetensors")
