#!/usr/bin/env python
"""End-to-end U-Net training throughput of the Lightning module that ``scripts/train.py`` runs (data loading,
guard, EMA, logging, checkpoint hooks included), on a synthetic latent cache; ``scripts/bench.py --only train``
times the bare step for comparison.

    python scripts/bench_train.py --latent 32 --batch 128 --steps 60 --compile --out train-e2e.jsonl
    python scripts/bench_train.py --latent 64 --batch 64 --steps 40 --compile
    python scripts/bench_train.py --latent 64 --batch 64 --compile --profile-steps 5   # then profile 5 more steps
    python scripts/bench_train.py --cpu                   # the tiny config on a CPU: a smoke run

Reports the first step (compile included), images/s over the steps after ``--warmup``, peak memory, and on a GPU
the synchronising CUDA calls per steady step by source line (``torch.cuda.set_sync_debug_mode``). With
``--profile-steps N``, N more steps run under torch.profiler after the timed ones: wall time against GPU kernel time
per step (the share the GPU is busy), kernels by category, the top kernels and the host operators. Random weights
and latents: the arithmetic and the loop are those of a real fine-tuning run, the numbers are not.

A step is an optimizer step (``trainer.max_steps``): with ``--override trainer.accumulate_grad_batches=k`` it is k
batches, which ``--steps``, ``--warmup``, ``--profile-steps`` and every "per step" figure follow. The rows count
both: ``steps`` (optimizer steps) and ``batches`` (of ``--batch`` images each), with ``accumulate_grad_batches``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import describe_run, emit  # noqa: E402
from bench_profile import SyncCounter, kernel_summary  # noqa: E402

GPU_CONFIG, CPU_CONFIG = "configs/diffusion/sd-v1-finetune.yaml", "configs/tiny/txt2img.yaml"
# keys the images/s arithmetic and the timed window take from this script's own flags: an --override of one would
# make the rows count images or steps that did not run
DERIVED_KEYS = {"data.batch_size": "--batch", "trainer.max_steps": "--steps and --profile-steps",
                "data.num_samples": "--batch, --steps and --profile-steps",
                "trainer.devices": "one device: the rows count one process's images"}


def make_cache(out: Path, n: int, latent: tuple[int, ...], context: tuple[int, ...], shards: int = 1,
               batch: int = 256) -> None:
    """``n`` samples of random latents and text states in the latent-cache format (``ldm.data.write_latent_cache``),
    in at least ``shards`` shards (one per data-loader worker and more)."""
    from ldm.data import write_latent_cache

    g = torch.Generator().manual_seed(0)
    spans = (range(i, min(i + batch, n)) for i in range(0, n, batch))
    batches = ({"image": torch.zeros(len(r), 1), "caption": [f"sample {j}" for j in r], "key": [f"{j:08d}" for j in r]}
               for r in spans)
    write_latent_cache(batches, lambda x: torch.randn(len(x), *latent, generator=g), out,
                       text_fn=lambda caps: torch.randn(len(caps), *context, generator=g),
                       max_count=max(1, -(-n // shards)), extra={"scale_factor": 1.0, "shift_factor": 0.0,
                                                                 "synthetic": True})


class Clock(L.Callback):
    """Wall time at each batch start and after the last batch of the last step (a device sync first), the
    synchronising calls of the steps after warm-up. ``warmup`` and ``steps`` are optimizer steps of ``accumulate``
    batches each. The end of training (export, last checkpoint) is not timed: ``on_done(clock)`` runs right after
    the last batch, so the numbers are out even if saving the end-of-training checkpoint is cut short."""

    def __init__(self, warmup: int, steps: int, count_syncs: bool, on_done=None, accumulate: int = 1) -> None:
        self.warmup, self.steps, self.on_done, self.accumulate = warmup, steps, on_done, accumulate
        self.starts: list[float] = []
        self.end = 0.0
        self.syncs = SyncCounter() if count_syncs else None

    def on_train_batch_start(self, trainer, module, batch, i: int) -> None:
        self._batch_start(i)

    def on_train_batch_end(self, trainer, module, outputs, batch, i: int) -> None:
        self._batch_end(i)

    def _batch_start(self, i: int) -> None:
        k = self.accumulate
        if i in (k, self.warmup * k) and torch.cuda.is_available():
            torch.cuda.synchronize()  # the first step's time holds all its GPU work; the steady steps start idle
        self.starts.append(time.perf_counter())
        if i == self.warmup * k and self.syncs is not None:
            self.syncs.start()

    def _batch_end(self, i: int) -> None:
        if i != self.steps * self.accumulate - 1:
            return
        if self.syncs is not None and i >= self.warmup * self.accumulate:
            self.syncs.stop()  # before the sync below, which it would count
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.end = time.perf_counter()
        if self.on_done is not None:
            self.on_done(self)


class StepProfile(L.Callback):
    """torch.profiler over the optimizer steps ``first`` .. ``first + count - 1`` (``accumulate`` batches each);
    ``on_done(row)`` gets wall and GPU kernel time per step, kernels by category, the top kernels and the host
    operators with the most self time."""

    def __init__(self, first: int, count: int, on_done, accumulate: int = 1) -> None:
        self.first, self.count, self.on_done, self.accumulate = first, count, on_done, accumulate
        self.prof, self.t0 = None, 0.0

    def on_train_batch_start(self, trainer, module, batch, i: int) -> None:
        if i != self.first * self.accumulate:
            return
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.prof = profile(activities=acts)
        self.prof.__enter__()
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, i: int) -> None:
        if self.prof is None or i != (self.first + self.count) * self.accumulate - 1:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - self.t0) * 1000 / self.count
        self.prof.__exit__(None, None, None)
        gpu_ms, cats, top = kernel_summary(self.prof, self.count)
        host = sorted((e for e in self.prof.key_averages() if e.device_type.name == "CPU"),
                      key=lambda e: -float(e.self_cpu_time_total))[:12]
        ms = 1000 * self.count
        host_rows = [{"name": e.key[:100], "self_ms_per_step": round(float(e.self_cpu_time_total) / ms, 3),
                      "calls_per_step": e.count / self.count} for e in host]
        self.prof = None
        self.on_done(dict(steps=self.count, batches=self.count * self.accumulate, wall_ms_per_step=wall_ms,
                          gpu_kernel_ms_per_step=gpu_ms, gpu_busy_share=gpu_ms / wall_ms if gpu_ms else None,
                          by_category_ms=cats, kernels=top, host_ops=host_rows))


def overrides(a, cache: Path, run_dir: Path, gpu: bool) -> list[str]:
    o = ["--config", a.config, "--run-dir", str(run_dir), f"data.train={cache}", f"data.batch_size={a.batch}",
         f"data.num_workers={a.workers}", f"data.num_samples={a.batch * total_batches(a)}",
         f"model.params.image_size={a.latent}", "train.init_checkpoint=null",
         f"trainer.max_steps={total_steps(a)}", "trainer.enable_progress_bar=false", "sample.every_n_steps=0",
         "train.checkpoint.every_n_steps=1000000", "train.warmup_steps=0", "trainer.log_every_n_steps=10",
         f"trainer.precision={'bf16-mixed' if gpu else '32-true'}", f"trainer.accelerator={'gpu' if gpu else 'cpu'}",
         "trainer.devices=1", "train.gradient_checkpointing=false", "logging.tensorboard=false"]
    o += ["train.compile=true"] if a.compile else []
    o += [f"train.channels_last={a.channels_last}"] if a.channels_last is not None else []
    o += ["trainer.benchmark=true"] if a.cudnn_benchmark else []
    return o + list(a.override)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="the tiny config on the CPU")
    p.add_argument("--config", default=None, help=f"training config (default {GPU_CONFIG}; --cpu: {CPU_CONFIG})")
    p.add_argument("--latent", type=int, default=None, help="latent side (32 = 256 px, 64 = 512 px)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="training steps in all (optimizer steps: k batches "
                   "each with --override trainer.accumulate_grad_batches=k)")
    p.add_argument("--warmup", type=int, default=None, help="steps left out of the rate (compile, autotuning)")
    p.add_argument("--workers", type=int, default=None, help="data loader workers")
    p.add_argument("--compile", action="store_true", help="train.compile=true")
    p.add_argument("--channels-last", choices=("true", "false"), default=None, help="train.channels_last")
    p.add_argument("--cudnn-benchmark", action="store_true", help="trainer.benchmark=true")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="after the timed steps, run this many more under torch.profiler (default 0: none)")
    p.add_argument("--override", action="append", default=[], help="more key=value overrides (repeatable)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    describe_run("scripts/bench_train.py", argv)
    gpu = torch.cuda.is_available() and not a.cpu
    a.config = a.config or (GPU_CONFIG if gpu else CPU_CONFIG)
    defaults = dict(latent=32, batch=128, steps=60, warmup=20, workers=8) if gpu else \
        dict(latent=8, batch=4, steps=6, warmup=2, workers=0)
    for k, v in defaults.items():
        setattr(a, k, v if getattr(a, k) is None else getattr(a, k))
    if not 0 < a.warmup < a.steps:
        p.error(f"--warmup must be between 0 and --steps ({a.steps}), got {a.warmup}")
    if a.profile_steps < 0:
        p.error(f"--profile-steps must be 0 or more, got {a.profile_steps}")
    for item in a.override:
        key = item.partition("=")[0].strip()
        if key in DERIVED_KEYS:
            p.error(f"--override {item}: {key} is set from {DERIVED_KEYS[key]}")
    from ldm.config import load_config
    from ldm.training.optim import accumulate_batches

    try:
        a.cfg = load_config(a.config, list(a.override))  # its context width sizes the synthetic cache
        a.accumulate = accumulate_batches(a.cfg)  # batches a step
    except ValueError as e:
        p.error(str(e))
    out = Path(a.out) if a.out else None
    return run(a, gpu, out)


def run(a, gpu: bool, out: Path | None) -> int:
    from ldm.cli.train import run as train

    ctx = (77, int(a.cfg.model.params.unet_config.params.context_dim))
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "latents"
        t0 = time.time()
        make_cache(cache, a.batch * total_batches(a), (4, a.latent, a.latent), ctx, shards=2 * max(a.workers, 1))
        emit(out, what="synthetic_cache_s", value=time.time() - t0, samples=a.batch * total_batches(a))
        reported: list[bool] = []
        clock = Clock(a.warmup, a.steps, count_syncs=gpu, on_done=lambda c: reported.append(report(a, c, gpu, out)),
                      accumulate=a.accumulate)
        callbacks: list[L.Callback] = [clock]
        if a.profile_steps:
            callbacks.append(StepProfile(a.steps, a.profile_steps, lambda row: emit(
                out, what="train_e2e_profile", **row, **run_tag(a)), accumulate=a.accumulate))
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        train(overrides(a, cache, Path(tmp) / "run", gpu), callbacks=callbacks)
    if not reported:
        raise SystemExit(f"bench_train: the run stopped after {len(clock.starts)} of {a.steps * a.accumulate} "
                         f"batches ({a.steps} steps)")
    return 0


def total_steps(a) -> int:
    """The timed steps and the profiled ones after them (optimizer steps: ``trainer.max_steps``)."""
    return a.steps + a.profile_steps


def total_batches(a) -> int:
    """The batches of :func:`total_steps` (``trainer.accumulate_grad_batches`` a step)."""
    return total_steps(a) * a.accumulate


def run_tag(a) -> dict:
    """The settings every row of the run carries."""
    return dict(config=a.config, latent=a.latent, batch=a.batch, accumulate_grad_batches=a.accumulate,
                compiled=a.compile, channels_last=a.channels_last, cudnn_benchmark=a.cudnn_benchmark)


def report(a, clock: Clock, gpu: bool, out: Path | None) -> bool:
    """Emit the first step, the steady rate (``steps``: optimizer steps, ``batches``: their batches), peak memory
    and the syncs per steady step."""
    steady, k = a.steps - a.warmup, a.accumulate
    tag = run_tag(a)
    emit(out, what="train_e2e_first_step_s", value=clock.starts[k] - clock.starts[0], **tag)
    rate = a.batch * steady * k / (clock.end - clock.starts[a.warmup * k])
    mem = torch.cuda.max_memory_allocated() / 2**30 if gpu else None
    emit(out, what="train_e2e_img_per_s", img_per_s=rate, steps=steady, batches=steady * k, peak_mem_gb=mem, **tag)
    if clock.syncs is not None:
        where = clock.syncs.where
        emit(out, what="train_e2e_syncs_per_step", value=sum(where.values()) / steady,
             where={k: v / steady for k, v in sorted(where.items(), key=lambda kv: -kv[1])}, **tag)
    return True

if __name__ == "__main__":
    sys.exit(main())
