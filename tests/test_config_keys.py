"""The train, sample, logging and trainer sections are checked before anything is built: a misspelt key, a key the
stage never reads, or a value of the wrong type names the key instead of being ignored or failing deep inside."""
from __future__ import annotations

import pytest
import torch

from ldm.cli.train import main, run
from ldm.registry import ConfigError

TINY = "configs/tiny/txt2img.yaml"


def train(tmp_path, *overrides, config=TINY):
    return run(["--config", config, "--run-dir", str(tmp_path), "trainer.max_steps=1", *overrides])


@pytest.mark.parametrize("config, override, match", [
    (TINY, "train.ema_decya=0.5", r"train.ema_decya: unknown key; allowed: .*ema_decay"),
    ("configs/tiny/clip.yaml", "train.init_checkpoint=x.safetensors", "not read by the clip stage"),
    ("configs/tiny/autoencoder.yaml", "train.ema_decay=0.9", "not read by the autoencoder stage"),
    ("configs/tiny/autoencoder.yaml", "sample.every_n_steps=10", "sample.every_n_steps=10 is not read by the "
                                                                 "autoencoder stage"),
    ("configs/tiny/clip.yaml", "train.lora.rank=4", "train.lora is not read by the clip stage"),
    (TINY, "train.lr=abc", r"train.lr: expected a number > 0, got 'abc'"),
    (TINY, "train.lr=0", "train.lr: expected a number > 0"),
    (TINY, "train.lora=4", "train.lora: expected a mapping"),
    (TINY, "train.lora.rank=-1", "rank to be an int ≥ 0"),
    (TINY, "train.betas=0.9", "train.betas: expected two numbers in"),
    (TINY, "train.caption_dropout=2", r"train.caption_dropout: expected a number ≥ 0 and ≤ 1"),
    (TINY, "train.grad_clip=-1", "train.grad_clip"),
    (TINY, "train.warmup_steps=1.5", "train.warmup_steps: expected an int"),
    (TINY, "train.compile=foo", "train.compile: expected true, false or a torch.compile backend"),
    (TINY, "train.ema_every_n_steps=0", "train.ema_every_n_steps: expected an int ≥ 1"),
    (TINY, "train.ema_decay=null train.ema_every_n_steps=10",
     "train.ema_every_n_steps is 10 but train.ema_decay is not set"),
    (TINY, "train.compile_mode=reduce_overhead", r"train.compile_mode: expected null or a torch.compile mode \(.*"
                                                  "reduce-overhead"),
    (TINY, "train.stage=unet", "train.stage: expected one of"),
    (TINY, "sample.bogus=1", "sample.bogus: unknown key"),
    (TINY, "logging.bogus=1", "logging.bogus: unknown key"),
    (TINY, "logging.wandb=true", "logging.wandb: expected a mapping"),
    (TINY, "logging.wandb.mode=onlin", "mode to be one of 'offline', 'online', 'disabled'"),
    (TINY, "trainer.limit_train_batches=2", "trainer.limit_train_batches is not supported: the data is one endless"),
    (TINY, "trainer.val_check_interval=5", "use train.val_every_n_steps"),
])
def test_bad_keys_and_values_are_named(tmp_path, config, override, match):
    with pytest.raises(ConfigError, match=match):
        train(tmp_path, *override.split(), config=config)  # one or more overrides, space-separated


def test_sample_prompts_as_one_string_is_one_prompt(tmp_path):
    from ldm.training.callbacks import SampleGrid

    trainer = train(tmp_path, "sample.every_n_steps=1", "sample.prompts=red apple", "sample.steps=1")
    grid = next(c for c in trainer.callbacks if isinstance(c, SampleGrid))
    assert grid.prompts == ["red apple"]
    with pytest.raises(ConfigError, match="sample.prompts: expected a list of prompts"):
        train(tmp_path / "b", "sample.every_n_steps=1", "sample.prompts=[]")
    with pytest.raises(ConfigError, match="sample.every_n_steps is set but sample.prompts is empty"):
        train(tmp_path / "c", "sample.every_n_steps=1", "sample.prompts=null")


def test_no_loggers_and_disabled_wandb(tmp_path):
    from ldm.training.step_log import LearningRates

    trainer = train(tmp_path, "logging.csv=false", "logging.tensorboard=false", "logging.wandb.mode=disabled")
    assert trainer.global_step == 1 and not trainer.loggers
    assert not any(isinstance(c, LearningRates) for c in trainer.callbacks)


def test_resume_from_the_wrong_file_is_named(tmp_path, caplog):
    ae = tmp_path / "ae"
    run(["--config", "configs/tiny/autoencoder.yaml", "--run-dir", str(ae), "trainer.max_steps=1",
         "train.checkpoint.every_n_steps=1"])
    code = main(["--config", TINY, "--run-dir", str(tmp_path / "d"), "trainer.max_steps=2",
                 "--resume", str(ae / "checkpoints" / "last.ckpt")])
    assert code == 2 and "not one of a train.stage=diffusion run (its stage: autoencoder)" in caplog.text
    code = main(["--config", TINY, "--run-dir", str(tmp_path / "d"), "--resume", str(ae / "model.safetensors")])
    assert code == 2 and "expected a training checkpoint" in caplog.text
    foreign = tmp_path / "sd.ckpt"
    torch.save({"state_dict": {"model.x": torch.zeros(1)}}, foreign)
    code = main(["--config", TINY, "--run-dir", str(tmp_path / "e"), "trainer.max_steps=1", "--resume", str(foreign)])
    assert code == 2 and "not a training checkpoint of ldm-train" in caplog.text
    truncated = tmp_path / "cut.ckpt"
    truncated.write_bytes((ae / "checkpoints" / "last.ckpt").read_bytes()[:5000])
    caplog.clear()
    code = main(["--config", TINY, "--run-dir", str(tmp_path / "f"), "--resume", str(truncated)])
    assert code == 2 and f"--resume {truncated}: not a readable training checkpoint" in caplog.text
    assert not (tmp_path / "f" / "config.yaml").exists()


def test_library_errors_end_the_cli_with_one_line(tmp_path, caplog):
    code = main(["--config", TINY, "--run-dir", str(tmp_path), "trainer.max_steps=1", "trainer.devices=0"])
    assert code == 2 and "devices" in caplog.text


@pytest.mark.parametrize("params, match", [
    ({"loss_type": "l1"}, r"model.params.loss_type: 'l1' is not read by the diffusion stage, which trains with the L2"),
    ({"l_simple_weight": 0.5}, "model.params.l_simple_weight"),
    ({"original_elbo_weight": 0.001}, "no variational-bound term"),
    ({"learn_logvar": True}, "model.params.learn_logvar"),
    ({"unet_trainable": "attn"}, "model.params.unet_trainable: 'attn'"),
    ({"first_stage_trainable": True}, "a frozen autoencoder"),
    ({"ucg_training": {"txt": 0.1}}, "drops captions with train.caption_dropout"),
    ({"scale_by_std": True}, "train.scale_factor: auto"),
    ({"use_ema": True}, "keeps an EMA only with train.ema_decay"),
])
def test_the_original_configs_training_keys_are_honoured_or_refused(tmp_path, params, match):
    """Keys of the original's model.params that steer its training: the model ignores them, so a value the diffusion
    stage would not train as is refused, naming the key and what to use."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(TINY)
    cfg.model.params.update(params)
    path = tmp_path / "original.yaml"
    OmegaConf.save(cfg, path)
    with pytest.raises(ConfigError, match=match):
        train(tmp_path / "run", "train.ema_decay=null", config=str(path))
    fine = {"loss_type": "l2", "l_simple_weight": 1.0, "original_elbo_weight": 0.0, "learn_logvar": False,
            "use_ema": False, "scale_by_std": True, "unet_trainable": True, "first_stage_trainable": False}
    cfg = OmegaConf.load(TINY)
    cfg.model.params.update({k: fine[k] for k in params if k in fine and k != "scale_by_std"})
    OmegaConf.save(cfg, path)
    train(tmp_path / "ok", config=str(path))  # the values it trains as are accepted


def test_the_original_lightning_section_is_refused_for_training(tmp_path):
    from omegaconf import OmegaConf

    import ldm

    cfg = OmegaConf.load(TINY)
    cfg.lightning = {"trainer": {"benchmark": True, "max_steps": 10}, "callbacks": {"image_logger": {}}}
    path = tmp_path / "original.yaml"
    OmegaConf.save(cfg, path)
    with pytest.raises(ConfigError, match=r"lightning.trainer, lightning.callbacks: .* not read by ldm-train"):
        train(tmp_path / "run", config=str(path))
    assert ldm.load(config=str(path)) is not None  # a model still loads from such a file
