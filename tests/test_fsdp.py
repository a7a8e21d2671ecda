"""``trainer.strategy: fsdp`` (ldm/training/sharding.py): the U-Net sharded over 2 CPU ranks (gloo) trains as DDP does
(same weights, EMA, validation losses and sample grids, with clipping, accumulation and the fused optimizer), its
checkpoints hold whole tensors and resume exactly, and what it does not combine with is refused by name."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.checkpoint import read_state_dict
from ldm.config import load_config
from ldm.training.logs import logged
from ranks import run_job, why

ROOT = Path(__file__).resolve().parents[1]
TINY = "configs/tiny/txt2img.yaml"
# grad_clip 1.0 (the tiny config's) clips from the second step on: the clipping norm must cover every rank's shards;
# the text encoder in SD v1's HF layout, whose state-dict keys are not attribute paths
SETTINGS = ["model.params.cond_stage_config.params.layout=hf", "trainer.devices=2", "trainer.accelerator=cpu",
            "trainer.max_steps=4", "trainer.log_every_n_steps=1",
            "trainer.accumulate_grad_batches=2", "train.fused_optimizer=true", "train.checkpoint.every_n_steps=2",
            "train.val_every_n_steps=2", "data.val=tests/fixtures/emoji/emoji32-000000.tar",
            "data.val_num_samples=240", "train.val_batches=2", "sample.every_n_steps=2", "sample.steps=3",
            "sample.prompts=[heart,face]", "train.snapshot_every_min=1000"]


def train(run_dir: Path, strategy: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", TINY, "--run-dir", str(run_dir),
           f"trainer.strategy={strategy}", *SETTINGS, *extra]
    r = run_job(cmd, run_dir, ROOT, timeout=300)
    assert r.returncode == 0, why(r)
    return r


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 4 steps under fsdp and under ddp, 2 ranks each."""
    base = tmp_path_factory.mktemp("fsdp")
    for strategy in ("fsdp", "ddp"):
        train(base / strategy, strategy)
    return base


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    sd, meta = read_state_dict(run_dir / "model.safetensors")
    assert "ldm_config" in meta
    return {k: v for k, v in sd.items() if k.startswith(("model.", "model_ema."))}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys() and any(k.startswith("model_ema.") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def test_sharded_training_matches_ddp(runs):
    """Weights and EMA within float rounding of DDP's (the averaged gradients are reduced in another order); the
    validation losses and the sample grids, drawn by every rank together and written by rank 0, the same."""
    assert_same_weights(weights(runs / "fsdp"), weights(runs / "ddp"), atol=1e-6)
    for key in ("val/loss", "val/loss_ema"):
        fsdp, ddp = logged(runs / "fsdp", key), logged(runs / "ddp", key)
        assert fsdp.keys() == ddp.keys() == {2, 4}
        assert all(float(fsdp[s]) == pytest.approx(float(ddp[s]), rel=1e-5) for s in fsdp)
    for step in (2, 4):
        grids = [np.asarray(Image.open(runs / s / "samples" / f"step_{step:08d}.png"), dtype=np.int16)
                 for s in ("fsdp", "ddp")]
        assert np.abs(grids[0] - grids[1]).max() <= 1
    assert (runs / "fsdp" / "snapshots" / "step_00000004" / "model.safetensors").is_file()


def test_checkpoints_hold_whole_tensors_in_ddps_layout(runs):
    """A sharded run's checkpoint is one file with the whole weights and optimizer state, keyed as DDP's."""
    ck = {s: torch.load(runs / s / "checkpoints" / "last.ckpt", weights_only=True) for s in ("fsdp", "ddp")}
    assert {k: v.shape for k, v in ck["fsdp"]["state_dict"].items()} == {
        k: v.shape for k, v in ck["ddp"]["state_dict"].items()}
    opt = [c["optimizer_states"][0] for c in ck.values()]
    assert opt[0]["state"].keys() == opt[1]["state"].keys()
    shapes = [{i: s["exp_avg_sq"].shape for i, s in o["state"].items()} for o in opt]
    assert shapes[0] == shapes[1]


def test_resume_is_exact_and_continues_a_ddp_checkpoint(runs, tmp_path):
    """From the step-2 checkpoint to step 4: the sharded run's own ends with its straight run's weights exactly;
    DDP's continues under fsdp (the checkpoints share one layout) to within rounding."""
    straight = weights(runs / "fsdp")
    for source, atol in (("fsdp", 0.0), ("ddp", 1e-6)):
        ckpt = runs / source / "checkpoints" / "step00000002.ckpt"
        train(tmp_path / source, "fsdp", "--resume", str(ckpt))
        assert_same_weights(weights(tmp_path / source), straight, atol=atol)


def test_the_compiled_sharded_unet_trains_as_the_eager_one(runs, tmp_path):
    """``train.compile`` traces the sharded U-Net's forward (aot_eager here: the CPU has no time for inductor)."""
    train(tmp_path, "fsdp", "train.compile=aot_eager")
    assert_same_weights(weights(tmp_path), weights(runs / "fsdp"), atol=1e-6)


def assert_refused(tmp_path: Path, config: str, overrides: list[str], match: str) -> None:
    from ldm.registry import ConfigError
    from ldm.training.trainer import build_trainer

    with pytest.raises(ConfigError, match=match):
        build_trainer(load_config(config, ["trainer.accelerator=cpu", "trainer.devices=2", *overrides]), tmp_path)


@pytest.mark.parametrize("override, key", [
    ("train.lora.rank=4", "train.lora"), ("train.compile_mode=reduce-overhead", "train.compile_mode"),
    ("train.channels_last=true", "train.channels_last"), ("trainer.precision=16-mixed", "trainer.precision"),
    ("model.params.cond_stage_trainable=true", "model.params.cond_stage_trainable")])
def test_what_fsdp_does_not_combine_with_is_refused_by_name(tmp_path, override, key):
    assert_refused(tmp_path, TINY, ["trainer.strategy=fsdp", override],
                   f"trainer.strategy=fsdp does not combine with {key}")


def test_other_stages_are_refused_under_fsdp(tmp_path):
    assert_refused(tmp_path, "configs/tiny/autoencoder.yaml", ["trainer.strategy=fsdp"],
                   "does not combine with train.stage: only the diffusion stage shards")


@pytest.mark.parametrize("strategy", ["fsdp_cpu_offload", "fsdp_full_shard", "deepspeed_stage_2"])
def test_other_weight_sharding_strategies_are_refused_naming_the_key(tmp_path, strategy):
    """Lightning's FSDP1 variants and DeepSpeed wrap the module in ways the EMA, the sample grids, exports and the
    clipping norm cannot read (they passed through to Lightning, which refuses FSDP on the CPU with its own message,
    and on GPUs would have trained with a broken EMA and export)."""
    assert_refused(tmp_path, TINY, [f"trainer.strategy={strategy}"],
                   f"trainer.strategy='{strategy}' is not supported: use fsdp")


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_sharded_training_on_the_gpu_matches_the_unsharded_run(tmp_path, compiled):
    """One CUDA rank (NCCL), bf16 autocast, fused AdamW on the DTensor shards with the clipping and skip flags, and
    with ``train.compile`` (inductor): the same losses and weights as the run without a strategy."""
    common = ["--config", TINY, "trainer.max_steps=6", "trainer.accelerator=gpu", "trainer.devices=1",
              "trainer.precision=bf16-mixed", "trainer.log_every_n_steps=1", f"train.compile={str(compiled).lower()}",
              "train.channels_last=false"]  # the compiled run without a strategy would take channels_last
    for name, strategy in (("plain", "auto"), ("fsdp", "fsdp")):
        r = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *common, "--run-dir",
                            str(tmp_path / name), f"trainer.strategy={strategy}"], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    plain, fsdp = (logged(tmp_path / n, "train/loss") for n in ("plain", "fsdp"))
    assert plain.keys() == fsdp.keys() and len(plain) == 6
    assert all(float(fsdp[s]) == pytest.approx(float(plain[s]), rel=1e-3) for s in plain)
    assert_same_weights(weights(tmp_path / "fsdp"), weights(tmp_path / "plain"), atol=1e-4)


def _on_gloo_rank(rank: int, port: int, fn, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.save(fn(rank), f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def on_two_gloo_ranks(fn, out: Path) -> list:
    """``fn(rank)`` in 2 CPU processes of one gloo process group: what each returned (saved under ``out``)."""
    import torch.multiprocessing as mp
    from test_multigpu_effects import free_port

    mp.spawn(_on_gloo_rank, args=(free_port(), fn, str(out)), nprocs=2)
    return [torch.load(f"{out}.{rank}", weights_only=True) for rank in (0, 1)]


def _snapshot_decisions(rank: int) -> dict[str, list[int]]:
    """Two gloo ranks whose clocks disagree about a snapshot: which batches each one snapshots at."""
    import time
    from types import SimpleNamespace

    from ldm.training.callbacks import Snapshots

    seen = {}
    for strategy in ("fsdp", "ddp"):
        trainer = SimpleNamespace(world_size=2, is_global_zero=rank == 0, global_step=0)
        module = SimpleNamespace(_trainer=SimpleNamespace(strategy=SimpleNamespace(strategy_name=strategy)))
        cb = Snapshots(Path("never-written"), every_min=1.0)  # its snapshot() is replaced below
        taken: list[int] = []
        cb.snapshot = lambda trainer, module, elapsed: taken.append(trainer.global_step)
        cb.on_train_start(trainer, module)
        for step, late in ((1, 0), (2, 1)):  # batch 1: rank 0's clock is past the minute; batch 2: rank 1's
            trainer.global_step = step
            cb._t0 = time.perf_counter() - (61.0 if rank == late else 0.0)
            cb.on_train_batch_end(trainer, module, None, None, step)
        seen[strategy] = taken
    return seen


def test_timed_snapshots_happen_on_every_rank_together_under_fsdp(tmp_path):
    """``train.snapshot_every_min`` under fsdp: the export is a gather every rank joins, so rank 0's clock decides for
    all (a rank that snapshots alone would pair its gather with another's training all-gather: a hang). Under ddp
    rank 0 exports alone and each rank keeps its own clock."""
    seen = on_two_gloo_ranks(_snapshot_decisions, tmp_path / "seen")
    assert [s["fsdp"] for s in seen] == [[1], [1]]  # rank 0's batch 1, on both; rank 1's own clock does not count
    assert [s["ddp"] for s in seen] == [[1], [2]]  # each its own (only rank 0 writes)


def _adamw_on_shards(rank: int) -> dict:
    """Two gloo ranks: AdamW through ``DTensor``'s dispatch and ``ShardLocalAdamW`` on the local shards, 3 steps
    each (fused with the guard's ``grad_scale``, and foreach), from the same weights and gradients."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    from ldm.training.optim import build_optimizer
    from ldm.training.sharding import ShardLocalAdamW

    mesh = init_device_mesh("cpu", (2,))
    g = torch.Generator().manual_seed(0)
    whole = [torch.randn(6, 5, generator=g), torch.randn(4, generator=g), torch.randn(3, 2, 2, 2, generator=g)]
    grads = [[torch.randn(w.shape, generator=g) for w in whole] for _ in range(3)]
    results = {}
    for fused in (True, False):
        for cls in (torch.optim.AdamW, ShardLocalAdamW):
            params = [torch.nn.Parameter(distribute_tensor(w, mesh, [Shard(0)])) for w in whole]
            opt = cls(params, lr=0.1, weight_decay=0.01, fused=fused or None, foreach=None if fused else True)
            for step in grads:
                for p, gr in zip(params, step):
                    p.grad = distribute_tensor(gr, mesh, [Shard(0)])
                if fused:
                    opt.grad_scale = torch.tensor(2.0)  # the guard's clip divisor
                opt.step()
            assert all(isinstance(s[k], DTensor) for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq"))
            results[f"{cls.__name__}/{'fused' if fused else 'foreach'}"] = [p.full_tensor() for p in params]
    module = SimpleNamespace(_trainer=None, trainer=None)
    t = OmegaConf.create({"lr": 0.1})
    results["built"] = type(build_optimizer(module, [torch.nn.Parameter(distribute_tensor(
        whole[0], mesh, [Shard(0)]))], t)["optimizer"]).__name__
    results["built_plain"] = type(build_optimizer(module, [torch.nn.Parameter(whole[0])], t)["optimizer"]).__name__
    return results


def test_adamw_on_local_shards_takes_the_steps_of_adamw_on_dtensors(tmp_path):
    """``ShardLocalAdamW`` (what fsdp trains with, without ``DTensor``'s dispatch of the multi-tensor kernel: 2 s at
    the first step and 13 ms of host time at each later one on the tiny U-Net) updates each rank's shards
    exactly as AdamW through ``DTensor`` does, fused (with a ``grad_scale``) and foreach, and keeps ``DTensor``
    moments; the stages build it exactly for sharded parameters."""
    for r in on_two_gloo_ranks(_adamw_on_shards, tmp_path / "adamw"):
        assert (r["built"], r["built_plain"]) == ("ShardLocalAdamW", "AdamW")
        for kind in ("fused", "foreach"):
            for a, b in zip(r[f"AdamW/{kind}"], r[f"ShardLocalAdamW/{kind}"]):
                torch.testing.assert_close(b, a, rtol=0, atol=0)
        assert not torch.equal(r["AdamW/fused"][0], r["AdamW/foreach"][0])  # the grad scale acted
