"""Three defects the project's notes left open, checked by what a user sees: ``--resume auto`` of a run folder
copied without its files' times, ``copy.deepcopy`` of a model after ``ldm.fast.optimize``, and the counts in
``scripts/bench_train.py``'s rows under gradient accumulation."""
from __future__ import annotations

import copy
import json
import os
import pickle
import shutil
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import cuda_stand_in
from script_loader import load_script

import ldm
from ldm.checkpoint import CheckpointError
from ldm.cli.train import resolve_resume, run
from ldm.cuda_graph import GraphedCall
from ldm.fast import optimize

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # the bench scripts import their helpers by name


# -- --resume auto: the last saved checkpoint (its recorded save time, then its step), not the last-modified file
def save_ckpt(path: Path, step: int, mtime_s: int, saved_at: float | None = None) -> Path:
    """A Lightning-like training checkpoint at ``step``, modified at ``mtime_s`` (seconds after an epoch far off);
    ``saved_at``: the save time ldm records inside it (None: a checkpoint of an ldm that recorded none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {} if saved_at is None else {"ldm_saved_at": saved_at}
    torch.save({"global_step": step, "batches_seen": step, "pytorch-lightning_version": "2.6.6",
                "state_dict": {"w": torch.full((2,), float(step))}, **extra}, path)
    os.utime(path, ns=(10**18 + mtime_s * 10**9,) * 2)
    return path


def test_resume_auto_of_a_copied_run_folder_takes_the_furthest_trained_checkpoint(tmp_path):
    """``cp -r`` (no ``-p``) gives the files the times of the copy, in whatever order it wrote them: an old
    pre-emption checkpoint copied after last.ckpt was taken as the newest, and the run went back 4 steps."""
    last = save_ckpt(tmp_path / "checkpoints" / "last.ckpt", 6, mtime_s=1)
    save_ckpt(tmp_path / "checkpoints" / "step00000004.ckpt", 4, mtime_s=2)
    save_ckpt(tmp_path / "hpc_ckpt_1.ckpt", 2, mtime_s=3)  # copied last: the newest time, the oldest state
    assert resolve_resume("auto", tmp_path) == str(last)
    hpc = save_ckpt(tmp_path / "hpc_ckpt_2.ckpt", 7, mtime_s=0)  # pre-empted after step 7: ahead of last.ckpt
    assert resolve_resume("auto", tmp_path) == str(hpc)


def test_resume_auto_prefers_last_ckpt_at_a_tie_and_reads_the_step_files(tmp_path):
    """last.ckpt, a periodic checkpoint and a pre-emption checkpoint of one step hold one state: last.ckpt is taken
    whatever the times (its callback state knows the periodic file); without it the files' steps still decide,
    where a run folder without last.ckpt used to start training again from step 0."""
    ck = tmp_path / "checkpoints"
    save_ckpt(ck / "step00000004.ckpt", 4, mtime_s=1)
    step6 = save_ckpt(ck / "step00000006.ckpt", 6, mtime_s=0)
    assert resolve_resume("auto", tmp_path) == str(step6)
    hpc = save_ckpt(tmp_path / "hpc_ckpt_1.ckpt", 6, mtime_s=5)
    assert resolve_resume("auto", tmp_path) == str(hpc)  # a tie without last.ckpt: the pre-emption checkpoint
    last = save_ckpt(ck / "last.ckpt", 6, mtime_s=0)
    for mtimes in [(1, 2, 3), (3, 2, 1)]:
        for path, t in zip([last, step6, hpc], mtimes):
            os.utime(path, ns=(10**18 + t * 10**9,) * 2)
        assert resolve_resume("auto", tmp_path) == str(last)


def test_resume_auto_refuses_an_unreadable_checkpoint_by_name(tmp_path):
    """A checkpoint whose step cannot be read might be the furthest one (a copy still under way): resuming from an
    older one instead would redo steps and then overwrite it, so the run stops, naming the file."""
    save_ckpt(tmp_path / "checkpoints" / "last.ckpt", 6, mtime_s=1)
    bad = tmp_path / "hpc_ckpt_1.ckpt"
    bad.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(CheckpointError, match=str(bad)):
        resolve_resume("auto", tmp_path)
    torch.save({"state_dict": {}}, bad)  # a pickle of weights without Lightning's step
    with pytest.raises(CheckpointError, match=f"{bad}.*global_step"):
        resolve_resume("auto", tmp_path)


def test_resume_auto_takes_the_last_saved_checkpoint_not_an_abandoned_higher_step(tmp_path):
    """After a deliberate ``--resume`` from an earlier checkpoint (a loss spike), the abandoned branch's files stay
    with higher steps: by the step alone ``--resume auto`` (a SLURM requeue) went back onto that branch. The save
    time recorded inside each file decides; files of an ldm that recorded none come after, by step."""
    ck = tmp_path / "checkpoints"
    save_ckpt(ck / "step00000010.ckpt", 10, mtime_s=5, saved_at=100.0)  # the abandoned branch
    save_ckpt(ck / "step00000050.ckpt", 50, mtime_s=6)  # an older ldm's file: no save time
    last = save_ckpt(ck / "last.ckpt", 6, mtime_s=0, saved_at=200.0)  # the branch resumed from step 4
    assert resolve_resume("auto", tmp_path) == str(last)


def test_a_rewound_run_resumes_on_its_new_branch(tmp_path):
    """A real tiny run to step 4, resumed by hand from its step-2 checkpoint and stopped at step 3: ``--resume
    auto`` continues from step 3 (the step rule took step00000004.ckpt, the abandoned branch)."""
    folder = tmp_path / "run"
    run([*TINY, "--run-dir", str(folder), "trainer.max_steps=4"])
    run([*TINY, "--run-dir", str(folder), "trainer.max_steps=3", "--resume",
         str(folder / "checkpoints" / "step00000002.ckpt")])
    chosen = resolve_resume("auto", folder)
    assert torch.load(chosen, map_location="cpu", weights_only=True)["global_step"] == 3


class RunsCode:
    """Unpickled, it would create the file ``marker`` (what a malicious pickle does with os.system)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_resume_auto_reads_the_steps_without_running_pickled_code(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "checkpoints" / "last.ckpt"
    path.parent.mkdir()
    torch.save({"global_step": 9, "callbacks": RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match=str(path)):
        resolve_resume("auto", tmp_path)
    assert not marker.exists()


FIXTURE = "tests/fixtures/emoji/emoji32-000000.tar"
TINY = ["--config", "configs/tiny/txt2img.yaml", "train.checkpoint.every_n_steps=2", "trainer.log_every_n_steps=1",
        "logging.tensorboard=false"]


class Steps(L.Callback):
    """The global step at the start of each training batch of a run."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_train_batch_start(self, trainer, module, batch, i: int) -> None:
        self.steps.append(trainer.global_step)


def test_a_copied_run_folder_resumes_from_its_furthest_step(tmp_path):
    """A real tiny run to step 4 with an older pre-emption checkpoint (step 2) beside it, copied with fresh times
    in the order cp happened to write them: the copy continues from step 4 (it went back to step 2)."""
    src, dst = tmp_path / "run", tmp_path / "copy"
    run([*TINY, "--run-dir", str(src), "trainer.max_steps=4"])
    shutil.copyfile(src / "checkpoints" / "step00000002.ckpt", src / "hpc_ckpt_1.ckpt")
    shutil.copytree(src, dst, copy_function=shutil.copyfile)  # no times kept, as cp -r
    os.utime(dst / "hpc_ckpt_1.ckpt", ns=(10**18 + 10**9,) * 2)
    os.utime(dst / "checkpoints" / "last.ckpt", ns=(10**18,) * 2)
    assert resolve_resume("auto", dst) == str(dst / "checkpoints" / "last.ckpt")
    trained = Steps()
    run([*TINY, "--run-dir", str(dst), "trainer.max_steps=6", "--resume", "auto"], callbacks=[trained])
    assert trained.steps == [4, 5]  # was [2, 3, 4, 5]: steps 2 and 3 trained again


# -- copy.deepcopy (and pickle) of a model after ldm.fast.optimize ------------------------------------------------
KW = dict(steps=2, height=32, width=32, seed=0, progress=False, output="tensor")


def tiny_model() -> ldm.LatentDiffusion:
    """The tiny model with its zero-initialised layers given weights, so that every weight shows in the output."""
    model = ldm.load(config="configs/tiny/txt2img.yaml")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    return model


def perturb(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(1.5)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_graphed_model_copies_into_an_independent_graphed_model(how):
    """optimize(unet_graph=True) (and the default compile_text="graph"): deepcopy raised "cannot pickle
    '_thread.lock' object". The copy samples what the original samples, with wrappers of its own (own lock, no
    graphs, bound to the copy's modules), and a change of its weights changes its samples only."""
    model = tiny_model()
    optimize(model, compile=False, unet_graph=True, fuse_projections=False)
    with torch.no_grad():
        ref = model.generate("a red apple", **KW)
        twin = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
        torch.testing.assert_close(twin.generate("a red apple", **KW), ref, rtol=0, atol=0)
    for mine, theirs, name in [(model.unet, twin.unet, "forward"),
                               (model.cond_stage_model, twin.cond_stage_model, "encode_ids")]:
        wrapper, copied = vars(mine)[name], vars(theirs)[name]
        assert isinstance(copied, GraphedCall) and copied is not wrapper and copied.lock is not wrapper.lock
        assert copied.graphs == {} and copied.fn.__self__ is theirs  # the copy's own module, graphs recorded anew
        assert [t.data_ptr() for t in copied.state()] == [t.data_ptr() for t in theirs.parameters()] + \
            [t.data_ptr() for t in theirs.buffers()]
        assert copied.settings() == wrapper.settings()
    twin.unet.train()  # a setting the graphs are keyed on: the copy's, read from the copy
    assert vars(twin.unet)["forward"].settings()[0] and not vars(model.unet)["forward"].settings()[0]
    twin.unet.eval()
    perturb(twin.unet)
    with torch.no_grad():
        assert not torch.equal(twin.generate("a red apple", **KW), ref)
        torch.testing.assert_close(model.generate("a red apple", **KW), ref, rtol=0, atol=0)


class FakeCompile:
    """torch.compile stand-in: the function itself, each call counted under the module whose method it is."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def __call__(self, fn, **kwargs):
        def compiled(*args, **kw):
            self.calls.append(fn.__self__)
            return fn(*args, **kw)

        return compiled


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_compiled_model_copies_into_one_that_runs_its_own_weights(how, monkeypatch):
    """optimize(compile=True): the copy kept the original's compiled forward, which calls the original's method: an
    EMA copy whose weights changed still sampled with the original's. The copy is compiled too, for itself, and an
    optimize call on the copy takes off what was compiled on the copy."""
    fake = FakeCompile()
    monkeypatch.setattr(torch, "compile", fake)
    model = tiny_model()
    optimize(model, scope="denoiser", fuse_projections=False, compile_text=True)
    with torch.no_grad():
        ref = model.generate("a red apple", **KW)
        twin = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
        fake.calls.clear()
        torch.testing.assert_close(twin.generate("a red apple", **KW), ref, rtol=0, atol=0)
        compiled = {type(m).__name__ for m in fake.calls}
        assert compiled == {"UNetModel", "Decoder", "CFGDenoiser", "OpenCLIPTextEncoder"}  # the copy is compiled
        own = {id(m) for m in [twin.unet, twin.vae.decoder, twin.guided_denoiser(), twin.cond_stage_model]}
        assert {id(m) for m in fake.calls} <= own  # ... and calls its own modules, never the original's
        perturb(twin.unet)
        assert not torch.equal(twin.generate("a red apple", **KW), ref)
        torch.testing.assert_close(model.generate("a red apple", **KW), ref, rtol=0, atol=0)
        optimize(twin, compile=False, fuse_projections=False, compile_text=False)  # the copy's last call wins
        fake.calls.clear()
        twin.generate("a red apple", **KW)
        assert fake.calls == []
        for obj in (twin.unet, twin.vae.decoder, twin.guided_denoiser()):
            assert "forward" not in vars(obj)
        model.generate("a red apple", **KW)
        assert fake.calls  # the original is still compiled


class StandInGraph:
    """A CUDA graph on the CPU: replaying it runs the recorded call again into the recorded output."""

    def replay(self) -> None:
        fn, args, out = self.recorded
        out.copy_(fn(*args))


def stand_in_cuda(monkeypatch) -> list:
    """torch.cuda's graph, stream and device calls replaced by CPU stand-ins (``tests/cuda_stand_in.py``); the list
    gets (fn, args, output) of each call of a function under test."""
    calls: list = []
    cuda_stand_in.stand_in_cuda(monkeypatch, StandInGraph, lambda: calls[-1])
    return calls


class Scaled(torch.nn.Module):
    """y = x · w, recording its calls for :class:`StandInGraph`."""

    def __init__(self, calls: list) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((3,), 2.0))
        self.calls = calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x * self.w
        self.calls.append((self.forward_eager, (x,), out))
        return out

    def forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


def test_a_copy_of_a_graphed_module_records_its_own_graphs_into_its_own_buffers(monkeypatch):
    """The graphs recorded before the copy hold the original's weights and static buffers: the copy starts without
    any and records its own at its first call, and its calls leave the original's static inputs alone."""
    from ldm.fast import graph_unet

    calls = stand_in_cuda(monkeypatch)
    module = Scaled(calls)
    graph_unet(module)
    vars(module)["forward"].device_type = "cpu"  # calls "on the GPU" (the stand-ins)
    x = torch.ones(3)
    with torch.no_grad():
        torch.testing.assert_close(module(x), x * 2)
        assert len(vars(module)["forward"].graphs) == 1
        twin = copy.deepcopy(module)
        copied = vars(twin)["forward"]
        assert copied.graphs == {} and copied.fn.__self__ is twin
        twin.w.fill_(5.0)
        torch.testing.assert_close(twin(x * 3), x * 15)  # the copy's weights, through its own graph
        (_, static_inputs, static_y), = copied.graphs.values()
        (_, original_inputs, original_y), = vars(module)["forward"].graphs.values()
        assert static_inputs[0].data_ptr() != original_inputs[0].data_ptr() and static_y is not original_y
        torch.testing.assert_close(original_inputs[0], x)  # not written by the copy's call
        torch.testing.assert_close(module(x * 4), x * 8)  # the original replays its own, with its weights


@pytest.mark.gpu
def test_a_copy_of_a_compiled_model_on_the_gpu_samples_with_its_own_weights():
    """optimize's default compile (inductor, reduce-overhead: CUDA graphs of the compiled U-Net and decoder). It
    comes before the eager-graph test below: once, two models compiled so crashed ("unspecified launch failure") in a
    process where graphed models had been freed before, with no copy involved (H100, torch 2.11): not this test's
    subject."""
    model = tiny_model().to("cuda")
    optimize(model, fuse_projections=False)
    kw = dict(KW, output="latent")
    with torch.no_grad():
        ref = model.generate("a red apple", **kw)
        twin = copy.deepcopy(model)
        out = twin.generate("a red apple", **kw)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        perturb(twin.unet)
        assert not torch.equal(twin.generate("a red apple", **kw), out)
        torch.testing.assert_close(model.generate("a red apple", **kw), ref, rtol=0, atol=0)


@pytest.mark.gpu
def test_a_copy_of_a_graphed_model_on_the_gpu_samples_with_its_own_graphs():
    model = tiny_model().to("cuda")
    optimize(model, compile=False, unet_graph=True, fuse_projections=False)
    kw = dict(KW, output="latent")
    with torch.no_grad():
        ref = model.generate("a red apple", **kw)
        twin = copy.deepcopy(model)
        assert vars(twin.unet)["forward"].graphs == {}
        out = twin.generate("a red apple", **kw)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        mine, theirs = vars(model.unet)["forward"].graphs, vars(twin.unet)["forward"].graphs
        assert mine.keys() == theirs.keys() and len(theirs) >= 1  # recorded for the copy, at its first calls
        for (_, inputs, y), (_, their_inputs, their_y) in zip(mine.values(), theirs.values()):
            assert y.data_ptr() != their_y.data_ptr()
            assert {t.data_ptr() for t in inputs}.isdisjoint(t.data_ptr() for t in their_inputs)
        perturb(twin.unet)
        assert not torch.equal(twin.generate("a red apple", **kw), out)
        torch.testing.assert_close(model.generate("a red apple", **kw), ref, rtol=0, atol=0)


# -- scripts/bench_train.py under gradient accumulation: steps are optimizer steps, batches are counted apart ------
def test_bench_train_rows_count_optimizer_steps_and_batches_apart(tmp_path):
    """With trainer.accumulate_grad_batches=2 the run trained --steps optimizer steps (2 batches each), while the
    clock timed --steps batches and the row's ``steps`` counted those batches. Now --steps, --warmup and
    --profile-steps count optimizer steps everywhere (the run, the clock, the profile), and the rows say how many
    batches that was."""
    out = tmp_path / "rows.jsonl"
    bench_train = load_script("bench_train")
    assert bench_train.main(["--cpu", "--profile-steps", "1", "--override", "trainer.accumulate_grad_batches=2",
                             "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by_what = {r["what"]: r for r in rows}
    assert len(rows) == len(by_what)  # each row once
    assert by_what["synthetic_cache_s"]["samples"] == 4 * 2 * 7  # batch 4 × 2 batches × (6 timed + 1 profiled) steps
    rate = by_what["train_e2e_img_per_s"]
    assert (rate["steps"], rate["batches"], rate["accumulate_grad_batches"]) == (4, 8, 2)  # 6 steps, 2 of warm-up
    prof = by_what["train_e2e_profile"]
    assert (prof["steps"], prof["batches"]) == (1, 2)
