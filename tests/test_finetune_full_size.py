"""Fine-tuning a full-size SD v1 checkpoint (random weights) on CPU: a few steps with LoRA and fully (slow: ~14 GB RAM)."""
from __future__ import annotations

import pytest
import torch

import ldm
from ldm.checkpoint import read_state_dict, save_safetensors
from ldm.cli.train import run

CFG = "configs/diffusion/sd-v1-finetune.yaml"
DATA = ["data.train=tests/fixtures/emoji/emoji32-000000.tar", "data.num_samples=240", "data.size=64",
        "data.batch_size=1", "data.num_workers=0", "trainer.accelerator=cpu", "trainer.precision=32-true",
        "trainer.enable_progress_bar=false", "sample.every_n_steps=0", "train.checkpoint.every_n_steps=100",
        "model.params.image_size=8", "train.warmup_steps=0", "train.lr=1e-4"]


@pytest.fixture(scope="module")
def sd_file(tmp_path_factory):
    torch.manual_seed(0)
    model = ldm.load(config="sd/v1-inference.yaml")
    path = tmp_path_factory.mktemp("sd") / "sd-v1-random.safetensors"
    save_safetensors({k: v.half() for k, v in model.state_dict().items()}, path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_finetune_sd_v1_on_cpu(sd_file, tmp_path, mode):
    extra = ["train.lora.rank=4"] if mode == "lora" else ["train.ema_decay=null"]
    trainer = run(["--config", CFG, "--run-dir", str(tmp_path), f"train.init_checkpoint={sd_file}",
                   "trainer.max_steps=2", *DATA, *extra])
    assert trainer.global_step == 2 and trainer.lightning_module.guard.skipped == 0
    base, _ = read_state_dict(sd_file)
    tuned, _ = read_state_dict(tmp_path / "model.safetensors")
    w = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    if mode == "lora":
        assert torch.equal(tuned[w].half(), base[w])  # base untouched; adapters on their own
        assert (tmp_path / "lora.safetensors").is_file()
    else:  # the zero-initialised output conv is the first to move (it gates every other gradient at step 1)
        out = "model.diffusion_model.out.2.weight"
        assert not torch.equal(tuned[out].half(), base[out])
    back = ldm.load(tmp_path / "model.safetensors")  # our export of a fine-tuned SD v1 loads again
    assert sum(p.numel() for p in back.unet.parameters()) == 859_520_964
