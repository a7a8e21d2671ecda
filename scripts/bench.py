#!/usr/bin/env python
"""Benchmark ldm against diffusers on identical architecture and weights, in one process on one device.

    python scripts/bench.py                      # GPU: SD-1.5 shapes, random weights, everything
    python scripts/bench.py --only unet,vae      # a subset: unet, vae, pipeline, train
    python scripts/bench.py --cpu                # the tiny config on the CPU (a smoke run)
    python scripts/bench.py --compile            # also the compiled variants (minutes of compile time)
    python scripts/bench.py --only attention,profile --compile   # kernels: attention at SD shapes, the
                                                 # matmul ceiling, a profile of the compiled U-Net step by category
    python scripts/bench.py --only train --compile-train   # training rows, eager and compiled (ours; diffusers
                                                 # too with --compile-train-diffusers)

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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_candidates import CANDIDATES  # noqa: E402

RESULTS: list[dict] = []
SD_SHAPES = True  # the FLOP counts above are for SD-1.5; other configs report no TFLOP/s
EAGER_OUT: dict[str, torch.Tensor] = {}  # U-Net outputs of the eager variant, to compare the compiled ones with
GFLOP = {"unet_b2_64": 1607.0, "train_img_32": 542.0, "train_img_64": 2410.0}  # REFERENCE.md, FlopCounterMode


INDUCTOR_SET: dict[str, object] = {}  # --inductor settings of this run, named in the training rows' variant
CANDIDATES_ON: list[str] = []  # --candidate patches of this run

CEILING: dict[str, float] = {}  # the matmul rate measured in this run (TFLOP/s), measured first on a GPU


def emit(out: Path | None, **kw) -> None:
    if isinstance(kw.get("tflops"), float) and CEILING:  # (the ceiling row itself comes before CEILING is set)
        kw["share_of_ceiling"] = round(kw["tflops"] / CEILING["tflops"], 3)
    kw["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    kw["torch"] = torch.__version__
    print(json.dumps(kw), flush=True)
    RESULTS.append(kw)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(kw) + "\n")


def timed(fn, warmup: int = 3, reps: int = 10, inner: int = 1) -> dict:
    """Median/min/max seconds of ``fn()`` (CUDA events on GPU, perf_counter on CPU). ``inner`` > 1 times that many
    back-to-back calls per repetition and divides: for kernels shorter than the launch latency of a lone call."""
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            s.record()
            for _ in range(inner):
                fn()
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e) / 1000 / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            ts.append((time.perf_counter() - t0) / inner)
    return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "reps": reps}


def build(config: str, device: str, dtype: torch.dtype, tmp: Path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    import ldm
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
    ours = ours.to(device=device, dtype=dtype).eval()
    if torch.device(device).type == "cuda":  # what ldm.load(..., device="cuda") gives a user: channels_last
        from ldm.loading import _fast_defaults

        _fast_defaults(ours)
    return ours, pipe.to(device)


@torch.no_grad()
def bench_unet(ours, pipe, res: int, out, tag: str, impls: tuple[str, ...] = ("ldm", "diffusers")) -> None:
    dev, dt = ours.device, ours.dtype
    ctx_dim = pipe.unet.config.cross_attention_dim
    torch.manual_seed(0)  # the same inputs for every variant
    x = torch.randn(2, 4, res, res, device=dev, dtype=dt)
    t = torch.tensor([500, 500], device=dev)
    c = torch.randn(2, 77, ctx_dim, device=dev, dtype=dt)
    y = {"ldm": ours.unet(x, t, context=c).float(), "diffusers": pipe.unet(x, t, encoder_hidden_states=c).sample.float()}
    emit(out, what="unet_max_abs_diff_vs_diffusers", variant=tag, value=float((y["ldm"] - y["diffusers"]).abs().max()),
         output_abs_max=float(y["ldm"].abs().max()))
    for impl in y:  # the fast path against the eager one, same weights and inputs
        if tag == "eager":
            EAGER_OUT[impl] = y[impl]
        elif impl in EAGER_OUT:
            emit(out, what="unet_max_abs_diff_vs_eager", impl=impl, variant=tag,
                 value=float((y[impl] - EAGER_OUT[impl]).abs().max()))
    for name, fn in (("ldm", lambda: ours.unet(x, t, context=c)),
                     ("diffusers", lambda: pipe.unet(x, t, encoder_hidden_states=c))):
        if name not in impls:
            continue
        # a lone call (synchronized before it: launch and host overhead count) and 10 back to back, as a sampling
        # loop runs them (the host prepares the next call while the GPU runs this one)
        for what, inner in ((f"unet_cfg_step_b2_{res}", 1), (f"unet_cfg_step_b2_{res}_back_to_back", 10)):
            r = timed(fn, 3, 20, inner=inner)
            tf = GFLOP["unet_b2_64"] * (res / 64) ** 2 / r["median_s"] / 1000
            emit(out, what=what, impl=name, variant=tag, tflops=tf if SD_SHAPES else None, **r)


@torch.no_grad()
def check_same_function(ours, pipe, res: int, out, dtype: torch.dtype) -> None:
    """Before anything trains or compiles: both U-Nets in fp32 on the same input agree (identical weights)."""
    x = torch.randn(2, 4, res, res, device=ours.device)
    t = torch.tensor([500, 500], device=ours.device)
    c = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, device=ours.device)
    a = ours.unet.float()(x, t, context=c)
    b = pipe.unet.float()(x, t, encoder_hidden_states=c).sample
    emit(out, what="unet_fp32_max_abs_diff_vs_diffusers", value=float((a - b).abs().max()),
         output_abs_max=float(a.abs().max()))
    ours.unet.to(dtype)
    pipe.unet.to(dtype)


@torch.no_grad()
def bench_vae(ours, pipe, res: int, out, tag: str) -> None:
    z = torch.randn(1, 4, res, res, device=ours.device, dtype=ours.dtype)
    for name, fn in (("ldm", lambda: ours.vae.decode(z)), ("diffusers", lambda: pipe.vae.decode(z))):
        emit(out, what=f"vae_decode_{res * 8}px", impl=name, variant=tag, **timed(fn, 2, 10))


@torch.no_grad()
def bench_pipeline(ours, pipe, px: int, batch: int, steps: int, out, tag: str,
                   impls: tuple[str, ...] = ("ldm", "diffusers")) -> None:
    prompts = ["a photograph of an astronaut riding a horse"] * batch
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None

    def run_ours():
        return ours.generate(prompts, sampler="euler", sigmas="discrete", steps=steps, guidance=7.5, height=px,
                             width=px, seed=0, progress=False, output="tensor")

    def run_diffusers():
        gen = torch.Generator(pipe.device).manual_seed(0)  # the same noise every call, as ours (seed=0)
        return pipe(prompts, num_inference_steps=steps, guidance_scale=7.5, height=px, width=px,
                    output_type="pt", generator=gen).images

    for name, fn in ((n, f) for n, f in (("ldm", run_ours), ("diffusers", run_diffusers)) if n in impls):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()  # compiled: the first call compiles (or loads from the cache) and captures the graphs
        img = fn().float()
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        if tag.startswith("compiled"):
            emit(out, what=f"txt2img_first_call_s_{px}px_b{batch}", impl=name, variant=tag, value=time.time() - t0)
        key = f"txt2img_{name}_{px}_{batch}"
        if tag == "eager":
            EAGER_OUT[key] = img
        elif key in EAGER_OUT:  # images in [0, 1]: the fast path against the eager one
            emit(out, what="txt2img_max_abs_diff_vs_eager", impl=name, variant=tag,
                 value=float((img - EAGER_OUT[key]).abs().max()), mean=float((img - EAGER_OUT[key]).abs().mean()))
        r = timed(fn, 1, 3 if batch > 1 else 5)
        mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        emit(out, what=f"txt2img_{px}px_{steps}steps_cfg_b{batch}", impl=name, variant=tag, peak_mem_gb=mem, **r)


def bench_train(ours, pipe, res: int, batch: int, out, impls=("ldm", "diffusers"), compiled: bool = False,
                profile: bool = False, channels_last: bool = False) -> None:
    """One U-Net training step: bf16 autocast, fp32 master weights, fused AdamW, random latents and context.

    ``compiled``: the U-Net forward through ``torch.compile`` (static shapes, as ``train.compile`` does); the first
    step's time (compile included) is reported apart. Each shape compiles once: calling this again with another
    ``res`` is the shape change a multi-resolution run makes. ``channels_last``: weights and latents in NHWC (as
    ``train.channels_last`` does).
    """
    dev = ours.device
    ctx_dim = pipe.unet.config.cross_attention_dim
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, 4, res, res, device=dev).to(memory_format=fmt)
    t = torch.randint(0, 1000, (batch,), device=dev)
    c = torch.randn(batch, 77, ctx_dim, device=dev)
    for name in impls:
        net = ours.unet if name == "ldm" else pipe.unet
        was = layout_of(net)  # restored after the row: our model comes in channels_last on a GPU, diffusers' not
        net.float().train().to(memory_format=fmt)
        if name == "ldm":  # the SD YAML says use_checkpoint: True; diffusers does not checkpoint by default
            net.set_gradient_checkpointing(False)
            net.fuse_projections(False)
        if compiled and "forward" not in vars(net):
            net.forward = torch.compile(net.forward, dynamic=False)
        fwd = net.forward
        opt = torch.optim.AdamW([p for p in net.parameters()], lr=1e-5, fused=dev.type == "cuda")

        def step():
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                y = fwd(x, t, context=c) if name == "ldm" else fwd(x, t, encoder_hidden_states=c).sample
                loss = torch.nn.functional.mse_loss(y.float(), x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        tag = ("compiled" if compiled else "eager") + ("_cl" if channels_last else "") + variant_suffix(net, name)
        if compiled:
            t0 = time.time()
            step()
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            emit(out, what=f"train_first_step_s_latent{res}_b{batch}", impl=name, variant=tag, value=time.time() - t0)
        r = timed(step, 3, 10)
        if profile and torch.cuda.is_available():
            copies: list = []
            total, cats, top = profile_step(step, 5, ops=copies)
            emit(out, what=f"train_profile_latent{res}_b{batch}", impl=name, variant=tag, total_ms_per_step=total,
                 by_category_ms=cats, kernels=top[:8], copy_ops=copies)
        ips = batch / r["median_s"]
        gf = GFLOP["train_img_32"] if res == 32 else GFLOP["train_img_64"]
        mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        emit(out, what=f"train_step_bf16_latent{res}_b{batch}", impl=name, variant=tag, img_per_s=ips,
             tflops=ips * gf / 1000 if SD_SHAPES else None, peak_mem_gb=mem, **r)
        net.eval().to(memory_format=was)
        opt.state.clear()  # the moments of this row, freed before the next
        torch.cuda.empty_cache() if torch.cuda.is_available() else None


def variant_suffix(net: torch.nn.Module, name: str) -> str:
    """What a training row ran with beyond layout and compile: our attention backend, cudnn.benchmark, inductor's
    layout optimization (off or forced), other ``--inductor`` settings, ``--candidate`` patches (ours only)."""
    import torch._inductor.config as inductor_config

    parts = [f"_{net.attn_backend}"] if name == "ldm" and net.attn_backend != "sdpa" else []
    parts += ["_cudnnbench"] if torch.backends.cudnn.benchmark else []
    parts += ["_nolayoutopt"] if not inductor_config.layout_optimization else []
    parts += ["_forcelayoutopt"] if inductor_config.force_layout_optimization else []
    parts += [f"_{k}={v}" for k, v in INDUCTOR_SET.items()]
    parts += [CANDIDATES[c][0] for c in CANDIDATES_ON] if name == "ldm" else []
    return "".join(parts)


def set_inductor_option(item: str) -> None:
    """``KEY=VALUE`` -> ``torch._inductor.config.KEY = VALUE`` (a Python literal; a dotted KEY reaches a
    sub-config such as ``triton.cudagraphs``); a key inductor does not have or a value that is no literal is a
    ValueError naming it."""
    import ast

    import torch._inductor.config as inductor_config

    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--inductor {item!r}: expected KEY=VALUE")
    *path, leaf = key.split(".")
    target = inductor_config
    for part in path:
        target = getattr(target, part, None)
    if target is None or not hasattr(target, leaf):
        raise ValueError(f"--inductor: torch._inductor.config has no option {key!r}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ValueError(f"--inductor {key}: {text!r} is not a Python literal (True, 3, 'name')") from None
    setattr(target, leaf, value)
    INDUCTOR_SET[key] = value


def layout_of(net: torch.nn.Module) -> torch.memory_format:
    """channels_last if the network's first 3×3-or-larger convolution weight is, else contiguous."""
    for p in net.parameters():
        if p.dim() == 4 and p.shape[-1] > 1 and p.shape[1] > 1:
            return torch.contiguous_format if p.is_contiguous() else torch.channels_last
    return torch.contiguous_format


def uncompile(net: torch.nn.Module) -> None:
    """Drop an instance-level compiled forward (the class's forward comes back)."""
    vars(net).pop("forward", None)


def bench_ceiling(out) -> float:
    """The card's measured bf16 matmul rate (8192³, TFLOP/s): the ceiling the U-Net's rates are shares of."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    r = timed(lambda: a @ b, 5, 20)
    tf = 2 * 8192**3 / r["median_s"] / 1e12
    emit(out, what="matmul_ceiling_bf16_8192", tflops=tf, **r)
    CEILING["tflops"] = tf
    return tf


# SD-1.5's attention shapes at 64×64 latents: (query tokens, key tokens, heads, head dim) and layers per U-Net pass
ATTN_SHAPES = {"self_64x64": (4096, 4096, 8, 40, 5), "self_32x32": (1024, 1024, 8, 80, 5),
               "self_16x16": (256, 256, 8, 160, 5), "self_8x8": (64, 64, 8, 160, 1),
               "cross_64x64": (4096, 77, 8, 40, 5), "cross_32x32": (1024, 77, 8, 80, 5)}


def bench_attention(out, batch: int = 2, train: bool = False, device: str = "cuda") -> None:
    """softmax(QKᵀ/√d)V alone at the SD-1.5 shapes, each SDPA kernel and ours: a CFG step's forward (batch 2, fp16)
    or, with ``train``, a training step's forward + backward (bf16). Ends with each kernel's total over one U-Net
    pass (every shape times its layer count)."""
    from torch.nn.attention import SDPBackend

    from ldm.attention import attention, sdpa_in_order

    kernels = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}
    dtype, what = (torch.bfloat16, "attention_train") if train else (torch.float16, "attention")
    totals: dict[str, float] = {}
    for name, (lq, lk, h, d, layers) in ATTN_SHAPES.items():
        q = torch.randn(batch, h, lq, d, device=device, dtype=dtype, requires_grad=train)
        k, v = (torch.randn(batch, h, lk, d, device=device, dtype=dtype, requires_grad=train) for _ in range(2))
        g = torch.randn_like(q)
        ref = attention(q, k, v, backend="math").float()
        gflop = 4 * batch * h * lq * lk * d / 1e9 * (3.5 if train else 1)  # backward: 2.5× the forward's matmuls

        def call(fn):
            if not train:
                with torch.no_grad():
                    return fn()
            q.grad = k.grad = v.grad = None
            y = fn()
            y.backward(g)
            return y

        impls = {kname: (lambda kb=kb: sdpa_in_order(q, k, v, [kb])) for kname, kb in kernels.items()}
        impls.update({f"ldm:{b}": (lambda b=b: attention(q, k, v, backend=b)) for b in ("sdpa", "cudnn", "flash")})
        for impl, fn in impls.items():
            try:
                diff = float((call(fn).float() - ref).abs().max())
                r = timed(lambda fn=fn: call(fn), 3, 30)
            except RuntimeError as e:  # no kernel of this kind for the shape on this card
                emit(out, what=f"{what}_{name}", impl=impl, batch=batch, error=str(e).splitlines()[0][:200])
                continue
            totals[impl] = totals.get(impl, 0.0) + layers * r["median_s"] * 1e3
            emit(out, what=f"{what}_{name}", impl=impl, batch=batch, tflops=gflop / r["median_s"] / 1e3,
                 max_abs_diff=diff, **r)
    emit(out, what=f"{what}_unet_pass_ms", batch=batch, by_impl_ms=totals)


KERNEL_CATEGORIES = (  # first match wins; names of cuDNN, cuBLAS, CUTLASS, flash and Triton kernels
    ("attention", ("flash", "fmha", "sdpa", "attention", "softmax")),
    ("convolution", ("conv", "implicit", "fprop", "dgrad", "wgrad", "nchw", "nhwc")),
    ("matmul", ("gemm", "cutlass", "nvjet", "matmul", "xmma", "mm_")),
    ("norm / elementwise (Triton)", ("triton",)),
    ("copy / layout", ("copy", "memcpy", "memset", "transpose", "cat")),
)


def kernel_category(name: str) -> str:
    low = name.lower()
    return next((c for c, keys in KERNEL_CATEGORIES if any(k in low for k in keys)), "other")


def is_annotation(key: str) -> bool:
    """Ranges that the profiler lists on the GPU timeline beside the kernels they contain (compiled graphs, optimizer
    steps): counting them would count those kernels twice."""
    return key.startswith(("## ", "Optimizer."))


def profile_step(fn, steps: int = 10, ops: list | None = None) -> tuple[float, dict[str, float], list[dict]]:
    """GPU kernel time of ``fn()`` per call (ms), by kernel category, and the top kernels (torch.profiler).
    ``ops``: if a list, the copy-like ATen ops and the operators that called them are appended to it (copy_sources)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    acts = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if ops is not None else [])
    with profile(activities=acts, record_shapes=ops is not None) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and not is_annotation(e.key)]
    by_cat: dict[str, float] = {}
    for e in kernels:
        cat = kernel_category(e.key)
        by_cat[cat] = by_cat.get(cat, 0.0) + float(e.device_time_total) / steps / 1000
    top = sorted(kernels, key=lambda e: -float(e.device_time_total))[:12]
    top_rows = [{"name": e.key[:120], "ms_per_step": round(float(e.device_time_total) / steps / 1000, 3),
                 "calls_per_step": e.count // steps} for e in top]
    if ops is not None:
        ops.extend(copy_sources(prof.events(), steps)[:16])
    cats = {k: round(v, 3) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])}
    return sum(by_cat.values()), cats, top_rows


COPY_OPS = ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy")


def copy_sources(events, steps: int) -> list[dict]:
    """The outermost copy-like ATen ops (a copy inside a copy counts once), grouped by op, input shapes and the
    operator that called them (its nearest non-copy CPU ancestor, e.g. ``aten::convolution_backward`` or a compiled
    graph), heaviest first: which operator's layout conversion the GPU time belongs to."""
    rows: dict[tuple[str, str, str], list[float]] = {}
    for e in events:
        parent = e.cpu_parent
        if e.name not in COPY_OPS or (parent is not None and parent.name in COPY_OPS):
            continue
        while parent is not None and parent.name in COPY_OPS + ("aten::to",):
            parent = parent.cpu_parent
        key = (e.name, str(e.input_shapes)[:160], parent.name[:80] if parent is not None else "(top level)")
        acc = rows.setdefault(key, [0.0, 0.0])
        acc[0] += 1
        acc[1] += float(e.device_time_total)
    ordered = sorted(rows.items(), key=lambda kv: -kv[1][1])
    return [{"op": op, "shapes": shapes, "called_from": via, "calls_per_step": n / steps,
             "gpu_ms_per_step": round(us / steps / 1000, 3)} for (op, shapes, via), (n, us) in ordered]


@torch.no_grad()
def profile_unet(ours, ctx_dim: int, res: int, out, tag: str) -> None:
    """GPU time per U-Net CFG step by kernel category, and the top kernels: what limits the step."""
    x = torch.randn(2, 4, res, res, device=ours.device, dtype=ours.dtype)
    t = torch.tensor([500, 500], device=ours.device)
    c = torch.randn(2, 77, ctx_dim, device=ours.device, dtype=ours.dtype)
    total, cats, top = profile_step(lambda: ours.unet(x, t, context=c))
    emit(out, what=f"unet_profile_b2_{res}", variant=tag, total_ms_per_step=total, by_category_ms=cats)
    emit(out, what=f"unet_profile_top_kernels_{res}", variant=tag, kernels=top)


def layer_calls(net: torch.nn.Module, fn) -> list[tuple[torch.nn.Module, tuple[int, ...]]]:
    """(module, input shape) of every Conv2d and Linear call during ``fn()``."""
    calls, hooks = [], []
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            hooks.append(m.register_forward_pre_hook(lambda mod, args: calls.append((mod, tuple(args[0].shape)))))
    try:
        fn()
    finally:
        for h in hooks:
            h.remove()
    return calls


def _fp8_mm(x2d: torch.Tensor, w: torch.Tensor):
    """A timed closure of Hopper's fp8 matmul (e4m3, per-tensor scales) for x2d @ wᵀ, or None if unsupported.
    Operands are quantized beforehand, so its time is a lower bound for an fp8 linear layer."""
    if not hasattr(torch, "_scaled_mm") or torch.cuda.get_device_capability() < (8, 9) or x2d.shape[1] % 16 or \
            w.shape[0] % 16:
        return None
    a = x2d.to(torch.float8_e4m3fn)
    b = w.to(torch.float8_e4m3fn).t()  # (K, N), column-major as _scaled_mm wants
    one = torch.ones((), device=x2d.device)
    return lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.float16)


@torch.no_grad()
def bench_layers(ours, ctx_dim: int, res: int, out) -> None:
    """Each distinct convolution and linear shape of one CFG U-Net call, alone (fp16, channels_last): time, TFLOP/s,
    times its count. Convolutions with cuDNN's heuristic and with ``cudnn.benchmark``; linears also as fp8."""
    import torch.nn.functional as F

    x = torch.randn(2, 4, res, res, device="cuda", dtype=torch.float16)
    t = torch.tensor([500, 500], device="cuda")
    c = torch.randn(2, 77, ctx_dim, device="cuda", dtype=torch.float16)
    groups: dict[tuple, list] = {}
    for m, shape in layer_calls(ours.unet, lambda: ours.unet(x, t, context=c)):
        key = (type(m).__name__, shape, tuple(m.weight.shape), getattr(m, "stride", None), getattr(m, "padding", None))
        groups.setdefault(key, [m, 0])[1] += 1
    totals: dict[str, float] = {}
    for (kind, shape, wshape, _, _), (m, n) in groups.items():
        inp = torch.randn(shape, device="cuda", dtype=torch.float16)
        w = m.weight.detach().to(torch.float16)
        if kind == "Conv2d":
            inp = inp.to(memory_format=torch.channels_last)
            w = w.to(memory_format=torch.channels_last)
            y = F.conv2d(inp, w, None, m.stride, m.padding)
            flop = 2 * y.numel() * w[0].numel()
            row = {}
            for bm in (False, True):
                torch.backends.cudnn.benchmark = bm
                row["benchmark" if bm else "heuristic"] = timed(lambda: F.conv2d(inp, w, None, m.stride, m.padding),
                                                                3, 10, inner=20)["median_s"]
            torch.backends.cudnn.benchmark = False
        else:
            x2d = inp.reshape(-1, shape[-1])
            flop = 2 * x2d.shape[0] * w.shape[0] * w.shape[1]
            row = {"fp16": timed(lambda: F.linear(x2d, w), 3, 10, inner=20)["median_s"]}
            f8 = _fp8_mm(x2d, w)
            if f8 is not None:
                row["fp8"] = timed(f8, 3, 10, inner=20)["median_s"]
        for k, v in row.items():
            totals[f"{kind}:{k}"] = totals.get(f"{kind}:{k}", 0.0) + n * v * 1000
        emit(out, what="layer", kind=kind, input=list(shape), weight=list(wshape), count=n, gflop=flop / 1e9,
             ms={k: round(v * 1000, 4) for k, v in row.items()},
             tflops={k: round(flop / v / 1e12, 1) for k, v in row.items()})
    emit(out, what=f"layers_total_ms_b2_{res}", by_kernel_choice={k: round(v, 3) for k, v in totals.items()})


@torch.no_grad()
def profile_pipeline(ours, px: int, steps: int, out, tag: str) -> None:
    """txt2img under torch.profiler: GPU kernel time of one call (compare with its timed wall time: the GPU's idle
    share is what launch overhead and host work leave)."""
    def run():
        return ours.generate(["a photograph of an astronaut riding a horse"], sampler="euler", sigmas="discrete",
                             steps=steps, guidance=7.5, height=px, width=px, seed=0, progress=False, output="tensor")

    total, cats, top = profile_step(run, 1)
    emit(out, what=f"txt2img_profile_{px}px_{steps}steps", impl="ldm", variant=tag, gpu_kernel_ms=total,
         by_category_ms=cats, kernels=top[:10])
    syncs = host_syncs(run)
    emit(out, what=f"txt2img_host_syncs_{px}px_{steps}steps", impl="ldm", variant=tag, count=sum(syncs.values()),
         where=dict(sorted(syncs.items(), key=lambda kv: -kv[1])[:10]))


def host_syncs(fn) -> dict[str, int]:
    """Synchronising CUDA calls made by one ``fn()`` (``torch.cuda.set_sync_debug_mode``), counted by source line."""
    torch.cuda.synchronize()
    with SyncCounter() as where:
        fn()
    return where


class SyncCounter:
    """Counts the synchronising CUDA calls made inside the block by source line (``torch.cuda.set_sync_debug_mode``);
    ``start()``/``stop()`` do the same across callbacks."""

    def __enter__(self) -> dict[str, int]:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> dict[str, int]:
        import warnings

        self.where: dict[str, int] = {}
        self._catch = warnings.catch_warnings(record=True)
        self._caught = self._catch.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self.where

    def stop(self) -> None:
        torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(None, None, None)
        for w in self._caught:
            if "synchroniz" in str(w.message):
                key = f"{Path(w.filename).name}:{w.lineno}"
                self.where[key] = self.where.get(key, 0) + 1


def compile_both(ours, pipe, mode: str, out) -> None:
    from ldm.fast import optimize

    t0 = time.time()
    optimize(ours, mode=mode)  # cuDNN attention on Hopper, fused projections, inductor flags (process-wide: both)
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
    p.add_argument("--only", default="attention,unet,vae,pipeline,train,profile",
                   help="comma list of: attention, attention_train, unet, vae, pipeline, train, profile, layers "
                        "(the matmul ceiling is always measured on a GPU)")
    p.add_argument("--compile", action="store_true", help="also time the compiled inference variants")
    p.add_argument("--skip-eager", action="store_true", help="compiled inference variants only (a cache probe)")
    p.add_argument("--compile-train", action="store_true", help="also time our compiled training step")
    p.add_argument("--compile-train-diffusers", action="store_true",
                   help="and diffusers' compiled training step (its first step compiles for minutes)")
    p.add_argument("--train-shapes", default=None, help="training rows as LATENTxBATCH items (default 32x32,64x16)")
    p.add_argument("--compile-train-shapes", default=None, help="compiled training rows (default: --train-shapes)")
    p.add_argument("--compile-train-diffusers-shapes", default=None,
                   help="diffusers' compiled training rows (default: --compile-train-shapes)")
    p.add_argument("--train-impls", default="ldm,diffusers", help="eager training rows of: ldm, diffusers")
    p.add_argument("--train-cl", action="store_true", help="training in channels_last (weights and latents)")
    p.add_argument("--train-attn", default=None, help="our attention backend in the training rows (sdpa, cudnn, flash)")
    p.add_argument("--train-cudnn-benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark in the training rows (Lightning's Trainer(benchmark=True))")
    p.add_argument("--no-layout-opt", action="store_true",
                   help="torch._inductor.config.layout_optimization off (inductor's own channels_last conversion)")
    p.add_argument("--force-layout-opt", action="store_true",
                   help="torch._inductor.config.force_layout_optimization: channels_last layout optimization in every "
                        "graph, the backward too (inductor turns it off in graphs with no forward convolution)")
    p.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                   help="set torch._inductor.config.KEY (a Python literal) for the whole run, e.g. "
                        "coordinate_descent_tuning=True; repeatable")
    p.add_argument("--candidate", action="append", default=[], choices=sorted(CANDIDATES),
                   help="patch our model with a change under test (scripts/bench_candidates.py); repeatable")
    p.add_argument("--attn-train-batches", default="64", help="batches of the attention_train rows, e.g. 32,64")
    p.add_argument("--mode", default="reduce-overhead", help="torch.compile mode for both sides")
    p.add_argument("--batch8", action="store_true", help="also txt2img at batch 8")
    p.add_argument("--eager-nchw", action="store_true",
                   help="also our eager rows with NCHW weights (the eager rows use channels_last, as ldm.load gives)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    only = set(a.only.split(","))
    unknown = only - {"ceiling", "attention", "attention_train", "unet", "vae", "pipeline", "train", "profile",
                      "layers"}
    if unknown:
        p.error(f"--only: unknown item(s) {', '.join(sorted(unknown))}")
    for shapes in (a.train_shapes, a.compile_train_shapes, a.compile_train_diffusers_shapes):
        parse_shapes(shapes or "")  # checked before minutes of model building
    parse_batches(a.attn_train_batches)
    if a.train_attn is not None:
        from ldm.attention import check_backend

        check_backend(a.train_attn)
    for item in a.inductor:
        try:
            set_inductor_option(item)
        except ValueError as e:
            p.error(str(e))
    for name in a.candidate:
        CANDIDATES[name][1]()
        CANDIDATES_ON.append(name)
    if a.no_layout_opt or a.force_layout_opt:
        import torch._inductor.config as inductor_config

        inductor_config.layout_optimization = not a.no_layout_opt
        inductor_config.force_layout_optimization = a.force_layout_opt
    out = Path(a.out) if a.out else None
    cpu = a.cpu or not torch.cuda.is_available()
    device, dtype = ("cpu", torch.float32) if cpu else ("cuda", torch.float16)
    config = a.config or ("configs/tiny/txt2img.yaml" if cpu else "sd/v1-inference.yaml")
    global SD_SHAPES
    SD_SHAPES = config in ("sd/v1-inference.yaml", "configs/sd/v1-inference.yaml")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    res, px = (8, 32) if cpu else (64, 512)
    if not cpu:  # always (a few seconds): every TFLOP/s row then also reports its share of this ceiling
        bench_ceiling(out)
    if not cpu and "attention" in only:
        bench_attention(out)
    if not cpu and "attention_train" in only:
        for b in parse_batches(a.attn_train_batches):
            bench_attention(out, batch=b, train=True)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        ours, pipe = build(config, device, dtype, Path(tmp))
        emit(out, what="build_s", value=time.time() - t0, config=config)
        check_same_function(ours, pipe, res, out, dtype)
        if "train" in only:  # training first: compiling for inference below rewrites the modules' forward
            run_train_rows(ours, pipe, res, cpu, a, out)
        variants = ([] if a.skip_eager else ["eager"] + (["eager_nchw"] if a.eager_nchw else [])) + (
        ["compiled", "compiled_denoiser"] if a.compile else [])
        for tag in variants:
            run_variant(ours, pipe, tag, res, px, cpu, only, a, out)
    summary()
    return 0


def run_variant(ours, pipe, tag: str, res: int, px: int, cpu: bool, only: set, a, out) -> None:
    """One inference variant: "eager", "eager_nchw" (ours only, NCHW weights), "compiled" (U-Net and decoder, both
    sides) or "compiled_denoiser" (ours only: the whole guided denoiser of a step as one graph,
    ``ldm.fast.optimize(scope="denoiser")``)."""
    from ldm.fast import compile_guided_denoiser

    if tag == "compiled":
        compile_both(ours, pipe, a.mode, out)
    if tag == "compiled_denoiser":
        compile_guided_denoiser(ours, backend="inductor", mode=a.mode, fullgraph=True, dynamic=False)
    impls = ("ldm",) if tag in ("compiled_denoiser", "eager_nchw") else ("ldm", "diffusers")
    steps = 50 if not cpu else 4
    was = layout_of(ours.unet)
    if tag == "eager_nchw":
        ours.unet.to(memory_format=torch.contiguous_format)
        ours.vae.to(memory_format=torch.contiguous_format)
    if "unet" in only and tag != "compiled_denoiser":
        bench_unet(ours, pipe, res, out, tag, impls)
    if "vae" in only and tag not in ("compiled_denoiser", "eager_nchw"):
        bench_vae(ours, pipe, res, out, tag)
    if "pipeline" in only:  # before the profiles: its first call is the compile
        bench_pipeline(ours, pipe, px, 1, steps, out, tag, impls)
        if a.batch8:
            bench_pipeline(ours, pipe, px, 8, steps, out, tag, impls)
    if "profile" in only and not cpu:
        if tag != "compiled_denoiser":
            profile_unet(ours, pipe.unet.config.cross_attention_dim, res, out, tag)
        profile_pipeline(ours, px, 50, out, tag)
    if "layers" in only and not cpu and tag == "eager":
        bench_layers(ours, pipe.unet.config.cross_attention_dim, res, out)
    ours.unet.to(memory_format=was)
    ours.vae.to(memory_format=was)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """"32x32,64x16" -> [(latent side, batch), ...]."""
    try:
        return [(int(r), int(b)) for r, b in (item.split("x") for item in text.split(",") if item)]
    except ValueError:
        raise SystemExit(f"--train-shapes/--compile-train-shapes: expected LATENTxBATCH items like 32x32,64x16, "
                         f"got {text!r}") from None


def parse_batches(text: str) -> list[int]:
    """"32,64" -> [32, 64]."""
    try:
        return [int(b) for b in text.split(",") if b]
    except ValueError:
        raise SystemExit(f"--attn-train-batches: expected integers like 32,64, got {text!r}") from None


def run_train_rows(ours, pipe, res: int, cpu: bool, a, out) -> None:
    """Eager rows (default 256 and 512 px, ours and diffusers), then the compiled ones, shape change included."""
    backend_was, benchmark_was = ours.unet.attn_backend, torch.backends.cudnn.benchmark
    if a.train_attn:
        ours.unet.set_attention_backend(a.train_attn)
    torch.backends.cudnn.benchmark = a.train_cudnn_benchmark or benchmark_was
    shapes = parse_shapes(a.train_shapes) if a.train_shapes else [(res // 2, 32 if not cpu else 4)] + (
        [(res, 16)] if not cpu else [])
    prof = "profile" in a.only
    for r, b in shapes:
        bench_train(ours, pipe, r, b, out, impls=[i for i in a.train_impls.split(",") if i], profile=prof,
                    channels_last=a.train_cl)
    impls = (["ldm"] if a.compile_train else []) + (["diffusers"] if a.compile_train_diffusers else [])
    cshapes = parse_shapes(a.compile_train_shapes) if a.compile_train_shapes else shapes
    dshapes = parse_shapes(a.compile_train_diffusers_shapes) if a.compile_train_diffusers_shapes else cshapes
    for impl in impls:  # ours first: diffusers' first compiled step takes minutes
        for r, b in (cshapes if impl == "ldm" else dshapes):
            bench_train(ours, pipe, r, b, out, impls=(impl,), compiled=True, profile=prof, channels_last=a.train_cl)
    uncompile(ours.unet)
    uncompile(pipe.unet)
    ours.unet.set_attention_backend(backend_was)
    torch.backends.cudnn.benchmark = benchmark_was
    if not cpu:
        ours.half()
        pipe.unet.half()


def summary() -> None:
    print("\nSUMMARY")
    for r in RESULTS:
        keys = ("median_s", "value", "img_per_s", "tflops", "share_of_ceiling", "peak_mem_gb", "total_ms_per_step")
        print(f"{r['what']:<40} {r.get('impl', ''):<10} {r.get('variant', ''):<9} " +
              " ".join(f"{k}={r[k]:.4g}" for k in keys if isinstance(r.get(k), float)))


if __name__ == "__main__":
    sys.exit(main())
