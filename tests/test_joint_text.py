"""The text encoder trained with the U-Net (model.params.cond_stage_trainable: true, ldm.diffusion.joint_text)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import read_state_dict
from ldm.cli.train import run
from ldm.diffusion.joint_text import unfreeze_text_encoder
from ldm.diffusion.lightning import LatentDiffusionModule
from ldm.registry import ConfigError

TINY = "configs/tiny/txt2img.yaml"
JOINT = "model.params.cond_stage_trainable=true"
PENULTIMATE = "model.params.cond_stage_config.params.layer=penultimate"  # SD 2's: the last block is never read


def module(*overrides: str) -> LatentDiffusionModule:
    cfg = OmegaConf.merge(OmegaConf.load(TINY), OmegaConf.from_dotlist(list(overrides)))
    torch.manual_seed(0)
    return LatentDiffusionModule(cfg)


def text_weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in read_state_dict(path)[0].items() if k.startswith("cond_stage_model.")}


def test_only_what_the_context_reads_trains() -> None:
    m = module(JOINT, PENULTIMATE)
    enc = m.net.cond_stage_model
    trained = {n for n, p in enc.named_parameters() if p.requires_grad}
    last = len(enc.model.transformer.resblocks) - 1
    assert trained and all(f"resblocks.{last}." not in n for n in trained)
    assert any(n.endswith("token_embedding.weight") for n in trained) and any("ln_final" in n for n in trained)
    assert "model.text_projection" not in trained
    assert enc.training and not enc.frozen  # dropout and norms as in training; train() no longer keeps it in eval
    frozen = module()
    assert not any(p.requires_grad for p in frozen.net.cond_stage_model.parameters())


def test_an_encoder_whose_context_reads_nothing_is_refused() -> None:
    class Constant(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

        def forward(self, prompts):
            return torch.zeros(len(prompts), 77, 4, requires_grad=True)

    with pytest.raises(ConfigError, match="Constant has no parameter its context depends on"):
        unfreeze_text_encoder(Constant())


def test_the_optimizer_holds_both_at_their_rates() -> None:
    m = module(JOINT, "train.lr=1e-4", "train.text_encoder_lr=2e-5")
    opt = m.configure_optimizers()["optimizer"]
    unet, text = opt.param_groups
    assert unet["initial_lr"] == pytest.approx(1e-4) and text["initial_lr"] == pytest.approx(2e-5)  # before warm-up
    assert {id(p) for p in text["params"]} == {id(p) for p in m.net.cond_stage_model.parameters() if p.requires_grad}
    assert {id(p) for p in unet["params"]} == {id(p) for p in m.net.model.parameters()}
    same = module(JOINT, "train.lr=1e-4").configure_optimizers()["optimizer"]
    assert [g["initial_lr"] for g in same.param_groups] == pytest.approx([1e-4, 1e-4])  # default: train.lr


def test_dropped_captions_are_the_current_encoders_empty_prompt_with_gradients() -> None:
    m = module(JOINT, "train.caption_dropout=1.0")
    gen = torch.Generator().manual_seed(0)
    c = m._context({"caption": ["a cat", "a dog"]}, gen)
    assert c.requires_grad
    with torch.no_grad():
        empty = m.net.cond_stage_model([""])
    torch.testing.assert_close(c.detach(), empty.expand(2, -1, -1))
    c.sum().backward()
    assert m.net.cond_stage_model.model.token_embedding.weight.grad is not None


def test_training_moves_the_text_encoder_and_exports_it(tmp_path) -> None:
    args = ["--config", TINY, "trainer.max_steps=3", "train.lr=1e-3", "train.warmup_steps=0"]
    run([*args, "--run-dir", str(tmp_path / "frozen"), PENULTIMATE])
    run([*args, "--run-dir", str(tmp_path / "joint"), PENULTIMATE, JOINT, "train.text_encoder_lr=1e-2"])
    before, after = text_weights(tmp_path / "frozen" / "model.safetensors"), text_weights(
        tmp_path / "joint" / "model.safetensors")
    assert before.keys() == after.keys()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    last = max(int(k.split("resblocks.")[1].split(".")[0]) for k in before if "resblocks." in k)
    assert any("token_embedding" in k for k in moved) and any("resblocks.0." in k for k in moved)
    assert not any(f"resblocks.{last}." in k for k in moved)  # not read by the context: not trained
    cfg = OmegaConf.load(tmp_path / "joint" / "config.yaml")
    assert cfg.model.params.cond_stage_trainable is True


# fused: the optimizer of a CUDA run, its skips and clip on the device (two parameter groups here)
@pytest.mark.parametrize("fused", ["false", "true"])
def test_a_resumed_joint_run_continues_exactly(tmp_path, fused) -> None:
    args = ["--config", TINY, "train.lr=1e-3", "train.warmup_steps=0", JOINT, "train.checkpoint.every_n_steps=2",
            "train.caption_dropout=0.5", f"train.fused_optimizer={fused}", "train.text_encoder_lr=3e-3"]
    run([*args, "--run-dir", str(tmp_path / "straight"), "trainer.max_steps=4"])
    run([*args, "--run-dir", str(tmp_path / "resumed"), "trainer.max_steps=2"])
    run([*args, "--run-dir", str(tmp_path / "resumed"), "trainer.max_steps=4", "--resume", "auto"])
    a = read_state_dict(tmp_path / "straight" / "model.safetensors")[0]
    b = read_state_dict(tmp_path / "resumed" / "model.safetensors")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("overrides,msg", [
    ((JOINT, "train.lora.rank=4"), "with train.lora"),
    (("train.text_encoder_lr=1e-5",), "train.text_encoder_lr is set but model.params.cond_stage_trainable"),
    (("model.params.cond_stage_trainable=2",), "expected true or false"),
])
def test_conflicting_settings_are_refused_by_name(overrides, msg) -> None:
    with pytest.raises(ConfigError, match=msg):
        module(*overrides)


def test_a_latent_cache_of_token_states_is_refused(tmp_path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    manifest = {"kind": "latents", "latent_shape": [4, 8, 8], "context_shape": [77, 64],
                "splits": {"train": {"count": 1, "shards": []}}}
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"data.train=.*latent cache holding the captions' token states"):
        module(JOINT, f"data.train={cache}")
