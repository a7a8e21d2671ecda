#!/usr/bin/env python
"""Benchmark ldm against diffusers on identical architecture and weights, in one process on one device.

    python scripts/bench.py                      # GPU: SD-1.5 shapes, random weights, everything
    python scripts/bench.py --only unet,vae      # a subset: unet, vae, pipeline, train
    python scripts/bench.py --cpu                # the tiny config on the CPU (a smoke run)
    python scripts/bench.py --compile            # also the compiled variants (minutes of compile time)

Our model is converted to diffusers' layout (ldm.convert.export_diffusers) and loaded by diffusers, so both sides
run the same weights; the U-Net outputs are compared first. Timings are medians of CUDA-event-timed repetitions
after warm-up. Prints JSON lines (also to --out) and a table last.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS: list[dict] = []
GFLOP = {"unet_b2_64": 1607.0, "train_img_32": 542.0, "train_img_64": 2410.0}  # REFERENCE.md, FlopCounterMode


def emit(out: Path | None, **kw) -> None:
    kw["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    kw["torch"] = torch.__version__
    print(json.dumps(kw), flush=True)
    RESULTS.append(kw)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(kw) + "\n")


def timed(fn, warmup: int = 3, reps: int = 10) -> dict:
    """Median/min/max seconds of ``fn()`` (CUDA events on GPU, perf_counter on CPU)."""
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "reps": reps}


def build(config: str, device: str, dtype: torch.dtype, tmp: Path):
    import ldm
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    from ldm.convert import export_diffusers

    torch.manual_seed(0)
    ours = ldm.load(config=config)
    with torch.no_grad():  # random weights, but no zero-initialised layer: every path carries signal
        for p in ours.parameters():
            if p.abs().max() == 0 and p.dim() > 1:
                p.normal_(0, 0.02)
    export_diffusers(ours, tmp / "sd")
    pipe = StableDiffusionPipeline.from_pretrained(tmp / "sd", torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return ours.to(device=device, dtype=dtype).eval(), pipe.to(device)


@torch.no_grad()
def bench_unet(ours, pipe, res: int, out, tag: str) -> None:
    dev, dt = ours.device, ours.dtype
    ctx_dim = pipe.unet.config.cross_attention_dim
    x = torch.randn(2, 4, res, res, device=dev, dtype=dt)
    t = torch.tensor([500, 500], device=dev)
    c = torch.randn(2, 77, ctx_dim, device=dev, dtype=dt)
    diff = (ours.unet(x, t, context=c).float() - pipe.unet(x, t, encoder_hidden_states=c).sample.float()).abs().max()
    emit(out, what="unet_max_abs_diff_vs_diffusers", variant=tag, value=float(diff))
    for name, fn in (("ldm", lambda: ours.unet(x, t, context=c)),
                     ("diffusers", lambda: pipe.unet(x, t, encoder_hidden_states=c))):
        r = timed(fn, 3, 20)
        tf = GFLOP["unet_b2_64"] * (res / 64) ** 2 / r["median_s"] / 1000
        emit(out, what=f"unet_cfg_step_b2_{res}", impl=name, variant=tag, tflops=tf, **r)


@torch.no_grad()
def bench_vae(ours, pipe, res: int, out, tag: str) -> None:
    z = torch.randn(1, 4, res, res, device=ours.device, dtype=ours.dtype)
    for name, fn in (("ldm", lambda: ours.vae.decode(z)), ("diffusers", lambda: pipe.vae.decode(z))):
        emit(out, what=f"vae_decode_{res * 8}px", impl=name, variant=tag, **timed(fn, 2, 10))


@torch.no_grad()
def bench_pipeline(ours, pipe, px: int, batch: int, steps: int, out, tag: str) -> None:
    prompts = ["a photograph of an astronaut riding a horse"] * batch
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None

    def run_ours():
        return ours.generate(prompts, sampler="euler", sigmas="discrete", steps=steps, guidance=7.5, height=px,
                             width=px, seed=0, progress=False, output="tensor")

    def run_diffusers():
        return pipe(prompts, num_inference_steps=steps, guidance_scale=7.5, height=px, width=px,
                    output_type="pt").images

    for name, fn in (("ldm", run_ours), ("diffusers", run_diffusers)):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        r = timed(fn, 1, 3 if batch > 1 else 5)
        mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        emit(out, what=f"txt2img_{px}px_{steps}steps_cfg_b{batch}", impl=name, variant=tag, peak_mem_gb=mem, **r)


def bench_train(ours, pipe, res: int, batch: int, out) -> None:
    """One U-Net training step: bf16 autocast, fp32 master weights, fused AdamW, random latents and context."""
    dev = ours.device
    ctx_dim = pipe.unet.config.cross_attention_dim
    x = torch.randn(batch, 4, res, res, device=dev)
    t = torch.randint(0, 1000, (batch,), device=dev)
    c = torch.randn(batch, 77, ctx_dim, device=dev)
    for name in ("ldm", "diffusers"):
        net = (ours.unet if name == "ldm" else pipe.unet).float().train()
        if name == "ldm":  # the SD YAML says use_checkpoint: True; diffusers does not checkpoint by default
            net.set_gradient_checkpointing(False)
        opt = torch.optim.AdamW([p for p in net.parameters()], lr=1e-5, fused=dev.type == "cuda")

        def step():
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                y = net(x, t, context=c) if name == "ldm" else net(x, t, encoder_hidden_states=c).sample
                loss = torch.nn.functional.mse_loss(y.float(), x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        r = timed(step, 3, 10)
        ips = batch / r["median_s"]
        gf = GFLOP["train_img_32"] if res == 32 else GFLOP["train_img_64"]
        mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        emit(out, what=f"train_step_bf16_latent{res}_b{batch}", impl=name, img_per_s=ips,
             tflops=ips * gf / 1000, peak_mem_gb=mem, **r)
        net.eval()


def compile_both(ours, pipe, mode: str, out) -> None:
    from ldm.fast import optimize

    t0 = time.time()
    optimize(ours, mode=mode)
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    pipe.fuse_qkv_projections()
    pipe.unet = torch.compile(pipe.unet, mode=mode, fullgraph=True)
    pipe.vae.decode = torch.compile(pipe.vae.decode, mode=mode, fullgraph=True)
    emit(out, what="compile_setup_s", value=time.time() - t0, mode=mode)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="tiny config on the CPU")
    p.add_argument("--config", default=None)
    p.add_argument("--only", default="unet,vae,pipeline,train")
    p.add_argument("--compile", action="store_true", help="also time the compiled variants")
    p.add_argument("--mode", default="reduce-overhead", help="torch.compile mode for both sides")
    p.add_argument("--batch8", action="store_true", help="also txt2img at batch 8")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    only = set(a.only.split(","))
    out = Path(a.out) if a.out else None
    cpu = a.cpu or not torch.cuda.is_available()
    device, dtype = ("cpu", torch.float32) if cpu else ("cuda", torch.float16)
    config = a.config or ("configs/tiny/txt2img.yaml" if cpu else "sd/v1-inference.yaml")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    res, px = (8, 32) if cpu else (64, 512)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        ours, pipe = build(config, device, dtype, Path(tmp))
        emit(out, what="build_s", value=time.time() - t0, config=config)
        if "train" in only:  # eager training first: compiling below rewrites the modules' forward
            bench_train(ours, pipe, res // 2, 32 if not cpu else 4, out)
            if not cpu:
                bench_train(ours, pipe, res, 16, out)
            ours.half() if not cpu else None
            pipe.unet.half() if not cpu else None
        variants = ["eager"] + (["compiled"] if a.compile else [])
        for tag in variants:
            if tag == "compiled":
                compile_both(ours, pipe, a.mode, out)
            if "unet" in only:
                bench_unet(ours, pipe, res, out, tag)
            if "vae" in only:
                bench_vae(ours, pipe, res, out, tag)
            if "pipeline" in only:
                t1 = time.time()
                bench_pipeline(ours, pipe, px, 1, 50 if not cpu else 4, out, tag)
                if tag == "compiled":
                    emit(out, what="compiled_pipeline_first_runs_s", value=time.time() - t1)
                if a.batch8:
                    bench_pipeline(ours, pipe, px, 8, 50 if not cpu else 4, out, tag)
    print("\nSUMMARY")
    for r in RESULTS:
        keys = ("median_s", "value", "img_per_s", "tflops", "peak_mem_gb")
        print(f"{r['what']:<40} {r.get('impl', ''):<10} {r.get('variant', ''):<9} " +
              " ".join(f"{k}={r[k]:.4g}" for k in keys if isinstance(r.get(k), float)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
