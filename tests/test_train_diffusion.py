"""Stage 2 training: a real Lightning run on the fixture shards, export, exact resume after SIGKILL, LoRA."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ldm
from ldm.checkpoint import read_state_dict
from ldm.cli.train import run
from ldm.training.logs import logged

TINY = "configs/tiny/txt2img.yaml"
ROOT = Path(__file__).resolve().parents[1]



def losses(run_dir: Path) -> dict[int, str]:
    return logged(run_dir, "train/loss")


def weights(path: Path) -> dict[str, torch.Tensor]:
    return read_state_dict(path)[0]


def test_train_export_and_sample(tmp_path):
    run(["--config", TINY, "--run-dir", str(tmp_path), "trainer.max_steps=4", "train.scale_factor=auto",
         "train.scale_batches=2", "sample.every_n_steps=4", "sample.prompts=[cat face]", "sample.steps=2",
         "train.snapshot_every_min=0.0001"])
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and (tmp_path / "config.yaml").is_file()
    index = [json.loads(line) for line in (tmp_path / "snapshots" / "index.jsonl").read_text().splitlines()]
    assert [r["step"] for r in index] == [1, 2, 3, 4]  # one per step at this interval, the last at the end
    assert all(r["train_s"] > 0 and r["images"] == r["step"] * 4 for r in index)  # batch 4 in the tiny config
    final = weights(tmp_path / "model.safetensors")
    snap = weights(Path(index[-1]["path"]))
    assert snap.keys() == final.keys() and all(torch.equal(snap[k], final[k]) for k in final)
    first = weights(Path(index[0]["path"]))
    assert any(not torch.equal(first[k], final[k]) for k in final if "diffusion_model" in k)  # training moved it
    assert (tmp_path / "samples" / "step_00000004.png").is_file()
    assert len(losses(tmp_path)) >= 1
    model = ldm.load(tmp_path / "model.safetensors", use_ema=True)
    scale = float(model.config.model.params.scale_factor)
    assert scale != 1.0 and float(model.vae.scale_factor) == pytest.approx(scale)  # measured, stored, reloaded
    assert model.generate(["cat face"], steps=2, seed=0, progress=False)[0].size == (32, 32)


def test_compiled_training_matches_eager_and_survives_a_shape_change(tmp_path):
    """train.compile (here the aot_eager backend: the same tracing as inductor, no C++ toolchain on CPU CI): same
    losses as eager, and the sampling callback's other batch shape recompiles instead of failing."""
    common = ["--config", TINY, "trainer.max_steps=3", "sample.every_n_steps=2", "sample.prompts=[cat face]",
              "sample.steps=2", "trainer.log_every_n_steps=1"]
    run(common + ["--run-dir", str(tmp_path / "eager")])
    from torch._dynamo.utils import counters

    counters.clear()
    run(common + ["--run-dir", str(tmp_path / "compiled"), "train.compile=aot_eager"])
    assert counters["stats"]["unique_graphs"] >= 2, dict(counters["stats"])  # the training shape and the sampling one
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert eager.keys() == compiled.keys() and len(eager) == 3
    assert all(float(compiled[k]) == pytest.approx(float(eager[k]), rel=1e-4) for k in eager)
    assert (tmp_path / "compiled" / "samples" / "step_00000002.png").is_file()
    assert (tmp_path / "compiled" / "model.safetensors").is_file()


@pytest.mark.parametrize(("train", "expected"), [
    ({"compile": True, "compile_mode": "reduce-overhead"}, True),
    ({"compile": True, "compile_mode": "max-autotune"}, True),
    ({"compile": True, "compile_mode": "max-autotune-no-cudagraphs"}, False), ({"compile": True}, False),
    ({"compile": False, "compile_mode": "reduce-overhead"}, False)])
def test_graph_replay_follows_the_compile_mode(train, expected):
    from omegaconf import OmegaConf

    from ldm.diffusion.lightning import replays_graphs

    assert replays_graphs(OmegaConf.create(train)) is expected


@pytest.mark.gpu
def test_training_replayed_from_cuda_graphs_matches_the_compiled_run(tmp_path, monkeypatch):
    """train.compile_mode=reduce-overhead: the U-Net's forward and backward replay CUDA graphs through training,
    validation (weights and EMA) and the sampling callback, with the same losses as the compiled run without graphs
    (the same inductor kernels), and no graph is skipped."""
    from torch._dynamo.utils import counters

    replays = [0]
    replay = torch.cuda.CUDAGraph.replay

    def counted(graph):
        replays[0] += 1
        return replay(graph)

    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", counted)

    common = ["--config", TINY, "trainer.max_steps=4", "trainer.accelerator=gpu", "train.compile=true",
              "train.ema_decay=0.9", "train.val_every_n_steps=2", "data.val=tests/fixtures/emoji/emoji32-000000.tar",
              "data.val_num_samples=240", "train.val_batches=2", "sample.every_n_steps=2",
              "sample.prompts=[cat face]", "sample.steps=2", "trainer.log_every_n_steps=1"]
    run(common + ["--run-dir", str(tmp_path / "plain")])
    counters.clear()
    plain_replays = replays[0]  # any other CUDA graph of the run (none expected) replays in both runs
    run(common + ["--run-dir", str(tmp_path / "graphs"), "train.compile_mode=reduce-overhead"])
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    graphed_replays = replays[0] - plain_replays
    assert graphed_replays >= plain_replays + 4  # forward and backward graphs, replayed in the steps after recording
    plain, graphs = losses(tmp_path / "plain"), losses(tmp_path / "graphs")
    assert plain.keys() == graphs.keys() and len(plain) == 4
    assert all(float(graphs[k]) == pytest.approx(float(plain[k]), rel=1e-3) for k in plain)
    val = [logged(tmp_path / d, "val/loss_ema") for d in ("plain", "graphs")]
    assert val[0].keys() == val[1].keys() and len(val[0]) >= 1
    assert all(float(val[1][k]) == pytest.approx(float(val[0][k]), rel=1e-3) for k in val[0])
    assert (tmp_path / "graphs" / "samples" / "step_00000004.png").is_file()


def _cmd(run_dir: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", TINY, "--run-dir", str(run_dir),
            "--resume", "auto", f"trainer.max_steps={steps}", "train.checkpoint.every_n_steps=2",
            "train.checkpoint.keep_last=10", *extra]


# fused: the optimizer of a CUDA run (skips on the device, counts read at log steps and checkpoints), here on the CPU;
# ema-every-3: the EMA folds 3 steps at steps 3 and 6, and the checkpoints (every 2 steps) fall between its passes
@pytest.mark.parametrize("extra", [(), ("train.fused_optimizer=true", "trainer.log_every_n_steps=3"),
                                   ("train.ema_every_n_steps=3",)],
                         ids=["host-guard", "fused-device-guard", "ema-every-3"])
def test_sigkill_and_resume_is_bit_identical(tmp_path, extra):
    steps = 8
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    subprocess.run(_cmd(straight, steps, *extra), check=True, cwd=ROOT, env=env, capture_output=True)
    proc = subprocess.Popen(_cmd(killed, steps, *extra), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ck = killed / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not list(ck.glob("step0000000[4-6].ckpt")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model.safetensors").exists(), "the run finished before it could be killed"
    subprocess.run(_cmd(killed, steps, *extra), check=True, cwd=ROOT, env=env, capture_output=True)
    a, b = weights(straight / "model.safetensors"), weights(killed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la, lb = losses(straight), losses(killed)
    assert la and all(lb[s] == la[s] for s in la if s in lb) and max(lb) == max(la)


def test_lora_finetune_saves_adapters_and_base_stays(tmp_path):
    # a base whose zero-initialised output projections have moved, so gradients reach the attention layers
    run(["--config", TINY, "--run-dir", str(tmp_path / "base"), "trainer.max_steps=2", "train.lr=1e-2",
         "train.warmup_steps=0"])
    base = tmp_path / "base" / "model.safetensors"
    run(["--config", TINY, "--run-dir", str(tmp_path / "lora"), "trainer.max_steps=3", f"train.init_checkpoint={base}",
         "train.lora.rank=4", "train.lr=1e-2", "train.warmup_steps=0"])
    lora = weights(tmp_path / "lora" / "lora.safetensors")
    assert lora and all("lora_" in k for k in lora)
    assert any(v.abs().sum() > 0 for k, v in lora.items() if k.endswith("lora_B"))  # adapters trained
    b, f = weights(base), weights(tmp_path / "lora" / "model.safetensors")
    assert all(torch.equal(b[k], f[k]) for k in b if k.startswith("model.diffusion_model"))  # base untouched
    plain = ldm.load(base)
    merged = ldm.load(base, lora=tmp_path / "lora" / "lora.safetensors", merge_lora=True)
    attached = ldm.load(base, lora=tmp_path / "lora" / "lora.safetensors")
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 64)
    with torch.no_grad():
        y0, y1, y2 = plain.unet(x, t, context=c), merged.unet(x, t, context=c), attached.unet(x, t, context=c)
    assert not torch.allclose(y0, y1) and torch.allclose(y1, y2, atol=1e-5)
    assert merged.state_dict().keys() == plain.state_dict().keys()  # merged: the original layout again
    kohya = ldm.load(base, lora=tmp_path / "lora" / "lora-kohya.safetensors")  # the copy for other tools
    assert all(torch.allclose(kohya.state_dict()[k], v, atol=1e-6) for k, v in merged.state_dict().items())


def test_latent_cache_with_context_trains(tmp_path):
    run(["--config", TINY, "--run-dir", str(tmp_path / "base"), "trainer.max_steps=1"])
    subprocess.run([sys.executable, str(ROOT / "scripts" / "cache_latents.py"),
                    "--model", str(tmp_path / "base" / "model.safetensors"),
                    "--data", "tests/fixtures/emoji/emoji32-000000.tar", "--out", str(tmp_path / "cache"), "--context",
                    "--batch-size", "16"], check=True, cwd=ROOT, capture_output=True)
    import json

    man = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert man["kind"] == "latents" and man["latent_shape"] == [4, 8, 8] and man["context_shape"] == [77, 64]
    trainer = run(["--config", TINY, "--run-dir", str(tmp_path / "cached"), f"data.train={tmp_path / 'cache'}",
                   "data.num_samples=null", "trainer.max_steps=2", "train.caption_dropout=0.5"])
    assert trainer.global_step == 2


def test_a_resume_refuses_changed_optimizer_and_ema_settings_and_keeps_the_config(tmp_path):
    """The checkpoint's optimizer, LR schedule and EMA decay come back as trained: a resume with another train.lr or
    train.ema_decay ran with the old values while config.yaml recorded the new ones. The refused run leaves the
    folder's config.yaml as it was (it was written before the model and checkpoint were read)."""
    from ldm.registry import ConfigError

    common = ["--config", TINY, "--run-dir", str(tmp_path), "train.warmup_steps=0", "sample.every_n_steps=0"]
    run([*common, "trainer.max_steps=2"])
    before = (tmp_path / "config.yaml").read_text()
    for change, match in (("train.lr=0.005", r"train.lr is 0.005 but the checkpoint was trained with 0.0001"),
                          ("train.ema_decay=0.5", r"train.ema_decay is 0.5 but .* 0.999")):
        with pytest.raises(ConfigError, match=match):
            run([*common, "trainer.max_steps=4", change, "--resume", "auto"])
        assert (tmp_path / "config.yaml").read_text() == before
    trainer = run([*common, "trainer.max_steps=4", "--resume", "auto"])  # the same settings: resumed
    assert trainer.global_step == 4 and "max_steps: 4" in (tmp_path / "config.yaml").read_text()
