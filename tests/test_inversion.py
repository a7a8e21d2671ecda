"""Textual inversion in the diffusion stage (train.textual_inversion, ldm.diffusion.inversion)."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

import ldm
from ldm.checkpoint import read_state_dict
from ldm.cli.train import run
from ldm.conditioning.embeddings import read_embedding
from ldm.diffusion.inversion import initial_vectors
from ldm.diffusion.lightning import LatentDiffusionModule
from ldm.registry import ConfigError

TINY = "configs/tiny/txt2img.yaml"
TI = {"name": "<emo>", "init_text": "flat emoji", "num_vectors": 3, "template": "{caption}, {name}"}


def config(ti=None, **train):
    cfg = OmegaConf.load(TINY)
    cfg.train.ema_decay = None
    cfg.train.textual_inversion = dict(TI) if ti is None else ti
    for k, v in train.items():
        cfg.train[k] = v
    return cfg


def module(cfg) -> LatentDiffusionModule:
    torch.manual_seed(0)
    return LatentDiffusionModule(cfg)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny model whose zero-initialised output projections have trained, so gradients reach the context."""
    out = tmp_path_factory.mktemp("base")
    run(["--config", TINY, "--run-dir", str(out), "trainer.max_steps=2", "train.lr=1e-2", "train.warmup_steps=0"])
    return out / "model.safetensors"


def ti_run(run_dir, base, steps, *extra):
    path = run_dir.parent / "ti.yaml"
    OmegaConf.save(config(), path)  # the template holds a comma and braces: a file, not a command-line override
    return run(["--config", str(path), "--run-dir", str(run_dir), f"trainer.max_steps={steps}", "train.lr=5e-2",
                "train.warmup_steps=0", f"train.init_checkpoint={base}", "train.checkpoint.every_n_steps=2", *extra])


def test_start_vectors_follow_the_init_texts_tokens() -> None:
    enc = module(config()).net.cond_stage_model
    ids = enc._encode_text("flat emoji")
    emb = enc.model.token_embedding.weight
    assert len(ids) == 2
    torch.testing.assert_close(initial_vectors(enc, "flat emoji", 4), emb[[ids[0], ids[0], ids[1], ids[1]]])
    torch.testing.assert_close(initial_vectors(enc, "flat emoji", None), emb[ids])  # one per token
    assert torch.equal(initial_vectors(enc, "", 2), torch.zeros(2, emb.shape[1]))


def test_only_the_new_words_vectors_train() -> None:
    m = module(config())
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable == ["net.cond_stage_model.extra_vectors"]
    assert m.net.cond_stage_model.extra_vectors.shape == (3, 64)
    groups = m.configure_optimizers()["optimizer"].param_groups
    assert len(groups) == 1 and groups[0]["params"] == [m.net.cond_stage_model.extra_vectors]


def test_training_moves_the_vectors_alone_and_exports_them(base, tmp_path) -> None:
    ti_run(tmp_path / "ti", base, 3)
    exported, original = read_state_dict(tmp_path / "ti" / "model.safetensors")[0], read_state_dict(base)[0]
    assert exported.keys() == {k for k in original if not k.startswith("model_ema.")}  # no EMA: no U-Net trains
    assert all(torch.equal(exported[k], original[k]) for k in exported)  # the base model, unchanged
    name, learned = read_embedding(tmp_path / "ti" / "learned_embeds.safetensors")  # diffusers' layout
    _, webui = read_embedding(tmp_path / "ti" / "embedding.safetensors", name="<emo>")  # the web UIs'
    assert name == "<emo>" and learned.shape == (3, 64) and torch.equal(learned, webui)
    start = initial_vectors(ldm.load(base).cond_stage_model, "flat emoji", 3)
    assert not torch.allclose(learned, start)  # trained
    model = ldm.load(tmp_path / "ti" / "model.safetensors",
                     embeddings=[str(tmp_path / "ti" / "learned_embeds.safetensors")])
    kw = dict(steps=2, seed=0, output="latent", progress=False)
    assert not torch.allclose(model.generate("a cat, <emo>", **kw), model.generate("a cat, emo", **kw))


def test_a_resumed_inversion_continues_exactly_and_keeps_its_settings(base, tmp_path) -> None:
    ti_run(tmp_path / "straight", base, 4)
    ti_run(tmp_path / "resumed", base, 2)
    ti_run(tmp_path / "resumed", base, 4, "--resume", "auto")
    a = read_state_dict(tmp_path / "straight" / "learned_embeds.safetensors")[0]["<emo>"]
    b = read_state_dict(tmp_path / "resumed" / "learned_embeds.safetensors")[0]["<emo>"]
    assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="--resume: train.textual_inversion is"):
        ti_run(tmp_path / "resumed", base, 6, "--resume", "auto", "train.textual_inversion.num_vectors=2")


def test_captions_that_never_name_the_word_stop_the_run(base, tmp_path) -> None:
    path = tmp_path / "plain.yaml"
    OmegaConf.save(config({"name": "<emo>", "init_text": "emoji"}), path)  # template "{caption}": the data's
    with pytest.raises(ConfigError, match="no caption of the batch names '<emo>'"):
        run(["--config", str(path), "--run-dir", str(tmp_path / "run"), "trainer.max_steps=1"])


@pytest.mark.parametrize("ti,train,msg", [
    ({"name": "<emo>", "vectors": 2}, {}, r"unknown key\(s\) \['vectors'\]"),
    ({"name": " "}, {}, "textual_inversion.name: expected a word"),
    ({"name": "<emo>", "num_vectors": 0}, {}, "num_vectors: expected a positive int"),
    ({"name": "<emo>", "template": "{name} {style}"}, {}, r"fields other than .*\['style'\]"),
    (TI, {"ema_decay": 0.999}, "set train.ema_decay=null"),
    (TI, {"lora": {"rank": 4}}, "with train.lora"),
])
def test_bad_settings_are_refused_by_name(ti, train, msg) -> None:
    with pytest.raises(ConfigError, match=msg):
        module(config(ti, **train))


def test_textual_inversion_with_the_joint_text_encoder_is_refused() -> None:
    cfg = config()
    cfg.model.params.cond_stage_trainable = True
    with pytest.raises(ConfigError, match="with model.params.cond_stage_trainable"):
        module(cfg)


def test_a_latent_cache_of_token_states_is_refused(tmp_path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "manifest.json").write_text(json.dumps({"kind": "latents", "context_shape": [77, 64], "splits": {}}))
    cfg = config()
    cfg.data.train = str(cache)
    with pytest.raises(ConfigError, match="made without the new word"):
        module(cfg)
