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
    python scripts/bench.py --compile --skip-eager --only unet --mode max-autotune --diffusers-mode reduce-overhead
                                                 # ours autotuned against diffusers at its best (issue 7's
                                                 # definition); scripts/bench_autotune_log.py reads the log
    python scripts/bench.py --compile --skip-eager --only pipeline --pipeline-batches 1,8 --text compile
                                                 # txt2img at batch 1 and 8, our text encoder compiled instead
                                                 # of replayed from a CUDA graph (the default)

Our model is converted to diffusers' layout (ldm.convert.export_diffusers) and loaded by diffusers, so both sides
run the same weights; the U-Net outputs are compared first. Timings are medians of CUDA-event-timed repetitions
after warm-up. Prints JSON lines (also to --out) and a table last.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

from ldm.diffusion.lightning import marking_steps, replays_graphs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_candidates import (  # noqa: E402
    CANDIDATES,
    INDUCTOR_SET,
    OURS_OPTIONS,
    OURS_SET,
    apply_candidate,
    candidate_suffixes,
    set_inductor_option,
    set_ours_option,
)
from bench_common import (bench_ceiling, bench_launch_floor, compile_breakdown, compile_counters,  # noqa: E402
                          describe_run, emit, summary, timed)
from bench_kernels import bench_attention, bench_layers  # noqa: E402
from bench_profile import host_syncs, profile_step  # noqa: E402

SD_SHAPES = True  # the FLOP counts below are for SD-1.5; other configs report no TFLOP/s
EAGER_OUT: dict[str, torch.Tensor] = {}  # U-Net outputs of the eager variant, to compare the compiled ones with
# SD-1.5's U-Net, torch.utils.flop_counter.FlopCounterMode with math attention (model FLOPs: a backward counts twice
# its forward, no recomputation), tests/test_bench_effects.py counts them again: the CFG step (batch 2, 64x64
# latents) batched and as guidance calls ours (x shared: the layers before the first cross-attention at batch 1),
# and a training step per image at 32x32 and 64x64 latents. Rows made before these counts used 542 GFLOP at 32x32
# (the backward's attention counted with flash's recomputation, unlike 64x64's 2,410) and 1,607 for the shared-x call
GFLOP = {"unet_b2_64": 1606.5, "unet_shared_x_b2_64": 1565.6, "train_img_32": 537.3, "train_img_64": 2406.8}
TRAIN_GFLOP = {32: GFLOP["train_img_32"], 64: GFLOP["train_img_64"]}  # per image, by latent side




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


# The U-Net calls bench_unet times: ours batched, ours as guidance calls it (x shared), diffusers batched.
UNET_CALLS = ("ldm", "ldm_shared_x", "diffusers")


@torch.no_grad()
def bench_unet(ours, pipe, res: int, out, tag: str, impls: tuple[str, ...] = ("ldm", "diffusers"),
               calls_on: tuple[str, ...] = UNET_CALLS) -> None:
    """The U-Net's CFG step (batch 2 at ``res``×``res`` latents) for each of ``calls_on`` (:data:`UNET_CALLS`),
    each compiled once more when ``tag`` is a compiled variant: leaving a call out saves its compile."""
    dev, dt = ours.device, ours.dtype
    ctx_dim = pipe.unet.config.cross_attention_dim
    torch.manual_seed(0)  # the same inputs for every variant; a CFG step: the same x_t and t for both prompts
    x = torch.randn(1, 4, res, res, device=dev, dtype=dt).repeat(2, 1, 1, 1)
    t = torch.tensor([500, 500], device=dev)
    c = torch.randn(2, 77, ctx_dim, device=dev, dtype=dt)
    calls = {"ldm": lambda: ours.unet(x, t, context=c), "diffusers": lambda: pipe.unet(x, t, encoder_hidden_states=c),
             # ours as its sampler calls it under guidance: x and t once, the layers before the first
             # cross-attention at batch 1 (UNetModel.forward's repeat)
             "ldm_shared_x": lambda: ours.unet(x[:1], t[:1], context=c, repeat=2)}
    calls = {name: fn for name, fn in calls.items() if name in calls_on}
    y = {}
    for impl, fn in calls.items():
        t0, before = time.time(), compile_counters()  # compiled: the first call compiles (or loads from the
        out_ = fn()  # cache, autotuning included)
        y[impl] = (out_.sample if impl == "diffusers" else out_).float()
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        if tag.startswith("compiled"):
            emit(out, what=f"unet_first_call_s_{res}", impl=impl, variant=tag, value=time.time() - t0,
                 phases=compile_breakdown(before))
    compare_unet_outputs(y, out, tag)
    for impl in y:  # the fast path against the eager one, same weights and inputs
        if is_reference(tag):
            EAGER_OUT[impl] = y[impl]
        elif impl in EAGER_OUT:
            emit(out, what="unet_max_abs_diff_vs_eager", impl=impl, variant=tag,
                 value=float((y[impl] - EAGER_OUT[impl]).abs().max()))
    for name, fn in calls.items():
        if name not in impls + (("ldm_shared_x",) if "ldm" in impls else ()):
            continue
        # a lone call (synchronized before it: launch and host overhead count) and 10 back to back, as a sampling
        # loop runs them (the host prepares the next call while the GPU runs this one)
        for what, inner in ((f"unet_cfg_step_b2_{res}", 1), (f"unet_cfg_step_b2_{res}_back_to_back", 10)):
            r = timed(fn, 3, 20, inner=inner)
            gflop = unet_gflop(name, res)
            emit(out, what=what, impl=name, variant=tag, tflops=gflop / r["median_s"] / 1000 if gflop else None, **r)


def unet_gflop(call: str, res: int) -> float | None:
    """GFLOP of one of :data:`UNET_CALLS` at ``res``×``res`` latents; counted for SD-1.5 at 64×64 only (attention
    grows faster than the rest), None otherwise. The shared-x call computes less than the batched ones."""
    if not SD_SHAPES or res != 64:
        return None
    return GFLOP["unet_shared_x_b2_64"] if call == "ldm_shared_x" else GFLOP["unet_b2_64"]


def compare_unet_outputs(y: dict[str, torch.Tensor], out, tag: str) -> None:
    """Rows of the largest differences between the calls' outputs that ran: ours against diffusers (batched, or
    shared-x when batched did not run), shared-x against batched."""
    ours = "ldm" if "ldm" in y else "ldm_shared_x"
    if ours in y and "diffusers" in y:
        emit(out, what="unet_max_abs_diff_vs_diffusers", impl=ours, variant=tag,
             value=float((y[ours] - y["diffusers"]).abs().max()), output_abs_max=float(y[ours].abs().max()))
    if "ldm" in y and "ldm_shared_x" in y:
        emit(out, what="unet_max_abs_diff_shared_x_vs_batched", variant=tag,
             value=float((y["ldm_shared_x"] - y["ldm"]).abs().max()))


SAME_FUNCTION_RTOL = 1e-2  # fp32 outputs further apart than this share of their largest value: not the same weights


@torch.no_grad()
def check_same_function(ours, pipe, res: int, out, dtype: torch.dtype) -> None:
    """Before anything trains or compiles: both U-Nets in fp32 (TF32 off, whatever the run uses) on the same input
    agree (identical weights); a SystemExit, after the row, where they do not: every comparison below would time two
    different functions."""
    x = torch.randn(2, 4, res, res, device=ours.device)
    t = torch.tensor([500, 500], device=ours.device)
    c = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, device=ours.device)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        a = ours.unet.float()(x, t, context=c)
        b = pipe.unet.float()(x, t, encoder_hidden_states=c).sample
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    diff, scale = float((a - b).abs().max()), float(a.abs().max())
    emit(out, what="unet_fp32_max_abs_diff_vs_diffusers", value=diff, output_abs_max=scale)
    ours.unet.to(dtype)
    pipe.unet.to(dtype)
    if not diff <= SAME_FUNCTION_RTOL * scale:  # (a NaN fails too)
        raise SystemExit(f"bench.py: our U-Net and diffusers' differ by {diff:.4g} in fp32 (outputs up to "
                         f"{scale:.4g}): not the same weights, so no timing of them compares like with like")


@torch.no_grad()
def bench_vae(ours, pipe, res: int, out, tag: str, stats: tuple[str, ...] = (),
              compile_kw: dict | None = None) -> None:
    """The decode of one ``res``×``res`` latent, ours and diffusers'; and ours again with its decoder's GroupNorm
    statistics computed by each method of ``stats`` (a copy of the decoder, compiled with ``compile_kw`` in a
    compiled variant): an A/B of the methods in one process, rows named ``<variant>_vae-<method>``."""
    z = torch.randn(1, 4, res, res, device=ours.device, dtype=ours.dtype)
    runs = [("ldm", tag, lambda: ours.vae.decode(z))]
    for method in stats:
        alt = decoder_with_stats(ours.vae.decoder, method, compile_kw)
        runs.append(("ldm", f"{tag}_vae-{method}", lambda alt=alt: decode_with(ours.vae, alt, z)))
    runs.append(("diffusers", tag, lambda: pipe.vae.decode(z)))
    for name, variant, fn in runs:
        emit(out, what=f"vae_decode_{res * 8}px", impl=name, variant=variant, **timed(fn, 2, 10))


def decoder_with_stats(decoder: torch.nn.Module, stats: str, compile_kw: dict | None) -> torch.nn.Module:
    """A copy of ``decoder`` whose GroupNorms compute their statistics with ``stats`` (``ldm.norm.STATS_METHODS``),
    compiled with ``compile_kw`` when given."""
    from ldm.norm import GroupNorm

    alt = copy.deepcopy(decoder)
    vars(alt).pop("forward", None)  # a compiled wrapper of the original's forward: the copy runs its own
    for m in alt.modules():
        if isinstance(m, GroupNorm):
            m.stats = stats
    if compile_kw is not None:
        alt.forward = torch.compile(alt.forward, **compile_kw)
    return alt


def decode_with(vae: torch.nn.Module, decoder: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """``vae.decode(z)`` through ``decoder`` (the autoencoder's own is put back afterwards)."""
    own = vae.decoder
    vae.decoder = decoder
    try:
        return vae.decode(z)
    finally:
        vae.decoder = own


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
        t0, before = time.time(), compile_counters()  # compiled: the first call compiles (or loads from the
        img = fn().float()  # cache) and captures the graphs
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        if tag.startswith("compiled"):
            emit(out, what=f"txt2img_first_call_s_{px}px_b{batch}", impl=name, variant=tag, value=time.time() - t0,
                 phases=compile_breakdown(before))
        key = f"txt2img_{name}_{px}_{batch}"
        if is_reference(tag):
            EAGER_OUT[key] = img
        elif key in EAGER_OUT:  # images in [0, 1]: the fast path against the eager one
            emit(out, what="txt2img_max_abs_diff_vs_eager", impl=name, variant=tag,
                 value=float((img - EAGER_OUT[key]).abs().max()), mean=float((img - EAGER_OUT[key]).abs().mean()))
        r = timed(fn, 1, 3 if batch > 1 else 5)
        mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        emit(out, what=f"txt2img_{px}px_{steps}steps_cfg_b{batch}", impl=name, variant=tag, peak_mem_gb=mem, **r)


def bench_train(ours, pipe, res: int, batch: int, out, impls=("ldm", "diffusers"), compiled: bool = False,
                profile: bool = False, channels_last: bool = False, inner: int = 1, mode: str | None = None) -> None:
    """One U-Net training step: bf16 autocast, fp32 master weights, fused AdamW, random latents and context.

    ``compiled``: the U-Net forward through ``torch.compile`` (static shapes, as ``train.compile`` does); the first
    step's time (compile included) is reported apart. Each shape compiles once: calling this again with another
    ``res`` is the shape change a multi-resolution run makes. ``channels_last``: weights and latents in NHWC (as
    ``train.channels_last`` does). ``inner`` > 1: also a row of that many steps back to back per timed repetition
    (no synchronisation between steps, as a training loop runs), besides the row of steps timed one by one.
    ``mode``: the compiled forward's torch.compile mode (``train.compile_mode``); "reduce-overhead" replays the
    forward and backward graphs from CUDA graphs, each call marked as a new step (:func:`marking_steps`).
    """
    dev = ours.device
    ctx_dim = pipe.unet.config.cross_attention_dim
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, 4, res, res, device=dev).to(memory_format=fmt)
    t = torch.randint(0, 1000, (batch,), device=dev)
    c = torch.randn(batch, 77, ctx_dim, device=dev)
    for name in impls:
        net = ours.unet if name == "ldm" else pipe.unet
        # layout and dtype restored after the row: our model comes in channels_last on a GPU, diffusers' not; the
        # other side's U-Net stays in its inference dtype during this row, as this one does during the other's
        was, dtype_was = layout_of(net), next(net.parameters()).dtype
        net.float().train().to(memory_format=fmt)
        if name == "ldm":  # the SD YAML says use_checkpoint: True; diffusers does not checkpoint by default
            net.set_gradient_checkpointing(False)
            net.fuse_projections(False)
        if compiled and "forward" not in vars(net):
            net.forward = torch.compile(net.forward, dynamic=False, mode=mode)
            if replays_graphs({"compile": True, "compile_mode": mode}):  # as train.compile_mode does
                net.forward = marking_steps(net.forward)
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
        layout = "_cl" if channels_last else ""
        tag = ("compiled" if compiled else "eager") + layout + (f"_{mode}" if compiled and mode else "")
        tag += variant_suffix(net, name, compiled)
        if compiled:
            t0 = time.time()
            step()
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            emit(out, what=f"train_first_step_s_latent{res}_b{batch}", impl=name, variant=tag, value=time.time() - t0)
        r = timed(step, 3, 10)
        if profile and torch.cuda.is_available():
            copies: list = []
            total, cats, top = profile_step(step, 5, ops=copies, top_n=60)
            emit(out, what=f"train_profile_latent{res}_b{batch}", impl=name, variant=tag, total_ms_per_step=total,
                 by_category_ms=cats, kernels=top, copy_ops=copies)
        mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        emit(out, what=f"train_step_bf16_latent{res}_b{batch}", impl=name, variant=tag, peak_mem_gb=mem,
             **train_rate(batch, res, r["median_s"]), **r)
        if inner > 1:
            rb = timed(step, 1, 5, inner)
            emit(out, what=f"train_steps_back_to_back_bf16_latent{res}_b{batch}", impl=name, variant=tag,
                 inner=inner, **train_rate(batch, res, rb["median_s"]), **rb)
        net.eval().to(dtype=dtype_was, memory_format=was)
        opt.state.clear()  # the moments of this row, freed before the next
        torch.cuda.empty_cache() if torch.cuda.is_available() else None


def train_rate(batch: int, res: int, seconds: float) -> dict:
    """A training row's images/s and, for SD-1.5 at a latent side counted in :data:`TRAIN_GFLOP`, TFLOP/s (None at
    another side: its FLOPs are not counted)."""
    ips = batch / seconds
    gf = TRAIN_GFLOP.get(res) if SD_SHAPES else None
    return {"img_per_s": ips, "tflops": ips * gf / 1000 if gf else None}


def variant_suffix(net: torch.nn.Module, name: str, compiled: bool = False) -> str:
    """What a training row ran with beyond layout and compile: our attention backend (ours only), then
    :func:`settings_suffix` (``compiled``: with the training candidates)."""
    parts = [f"_{net.attn_backend}"] if name == "ldm" and net.attn_backend != "sdpa" else []
    return "".join(parts) + settings_suffix(name, compiled_training=compiled)


def settings_suffix(name: str = "ldm", compiled_inference: bool = False, compiled_training: bool = False) -> str:
    """The run's settings, as a variant suffix: cudnn.benchmark, ``--inductor`` settings (process-wide), then on our
    compiled inference rows only ``--ours-inductor`` settings and the inference ``--candidate`` patches, on our
    compiled training rows the training candidates."""
    parts = ["_cudnnbench"] if torch.backends.cudnn.benchmark else []
    parts += [f"_{k}={v}" for k, v in INDUCTOR_SET.items()]
    if name == "ldm" and compiled_inference:
        parts += [f"_ours-{k}={v}" for k, v in OURS_SET.items()]
        parts += candidate_suffixes("inference")
    if name == "ldm" and compiled_training:
        parts += candidate_suffixes("training")
    return "".join(parts)


def inference_tag(tag: str, mode: str, diffusers_mode: str | None = None, text: str = "graph",
                  attn: str | None = None) -> str:
    """An inference variant's name in the rows: the variant, the compile mode where it is not reduce-overhead (and
    diffusers' where it differs from ours), our text encoder where it is not the default CUDA graph (``--text``),
    our compiled attention backend where one is asked for (``--attn``: diffusers' rows ran theirs), then the
    process-wide settings (and, on compiled rows, the candidates: they tune our compiled graphs only, so
    diffusers' rows with the same name ran without them)."""
    compiled = tag.startswith("compiled")
    mode_part = f"_{mode}" if compiled and mode != "reduce-overhead" else ""
    mode_part += f"_diffusers-{diffusers_mode}" if compiled and diffusers_mode not in (None, mode) else ""
    mode_part += f"_text-{text}" if compiled and text != "graph" else ""
    mode_part += f"_attn-{attn}" if compiled and attn else ""
    return tag + mode_part + settings_suffix(compiled_inference=compiled)


def is_reference(tag: str) -> bool:
    """Whether rows named ``tag`` are the plain eager run, whose outputs the other variants are compared with."""
    return tag == inference_tag("eager", "reduce-overhead")


def layout_of(net: torch.nn.Module) -> torch.memory_format:
    """channels_last if the network's first 3×3-or-larger convolution weight is, else contiguous."""
    for p in net.parameters():
        if p.dim() == 4 and p.shape[-1] > 1 and p.shape[1] > 1:
            return torch.contiguous_format if p.is_contiguous() else torch.channels_last
    return torch.contiguous_format


def uncompile(net: torch.nn.Module) -> None:
    """Drop an instance-level compiled forward (the class's forward comes back)."""
    vars(net).pop("forward", None)


@torch.no_grad()
def profile_unet(ours, pipe, res: int, out, tag: str) -> None:
    """GPU time per U-Net CFG step by kernel category, every kernel (heaviest first; rows before the third 12-03
    session also listed the top 12 apart) and the timeline's launches and idle gaps:
    what limits the step. Ours as guidance calls it: one x for both prompts (``repeat=2``; rows before the sixth 11-29
    session profiled [x; x]); diffusers' as its pipeline calls it, [x; x]."""
    x = torch.randn(1, 4, res, res, device=ours.device, dtype=ours.dtype)
    t = torch.tensor([500], device=ours.device)
    c = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, device=ours.device, dtype=ours.dtype)
    x2, t2 = x.repeat(2, 1, 1, 1), t.repeat(2)
    calls = {"ldm": ("shared_x", lambda: ours.unet(x, t, context=c, repeat=2)),
             "diffusers": ("batched", lambda: pipe.unet(x2, t2, encoder_hidden_states=c))}
    for impl, (call, fn) in calls.items():
        timeline: dict = {}
        total, cats, every = profile_step(fn, timeline=timeline, top_n=1000)
        emit(out, what=f"unet_profile_b2_{res}", impl=impl, variant=tag, call=call, total_ms_per_step=total,
             by_category_ms=cats)
        emit(out, what=f"unet_profile_all_kernels_{res}", impl=impl, variant=tag, call=call, kernels=every)
        emit(out, what=f"unet_timeline_b2_{res}", impl=impl, variant=tag, call=call, **timeline)


@torch.no_grad()
def profile_vae(ours, pipe, res: int, out, tag: str) -> None:
    """GPU time of one VAE decode by kernel category and its top kernels, ours and diffusers' (same weights)."""
    z = torch.randn(1, 4, res, res, device=ours.device, dtype=ours.dtype)
    for name, fn in (("ldm", lambda: ours.vae.decode(z)), ("diffusers", lambda: pipe.vae.decode(z))):
        total, cats, top = profile_step(fn)
        emit(out, what=f"vae_profile_{res * 8}px", impl=name, variant=tag, total_ms_per_step=total,
             by_category_ms=cats, kernels=top)


@torch.no_grad()
def profile_pipeline(ours, px: int, steps: int, out, tag: str) -> None:
    """txt2img under torch.profiler: GPU kernel time of one call (compare with its timed wall time: the GPU's idle
    share is what launch overhead and host work leave)."""
    def run():
        return ours.generate(["a photograph of an astronaut riding a horse"], sampler="euler", sigmas="discrete",
                             steps=steps, guidance=7.5, height=px, width=px, seed=0, progress=False, output="tensor")

    timeline: dict = {}
    total, cats, top = profile_step(run, 1, timeline=timeline)
    emit(out, what=f"txt2img_profile_{px}px_{steps}steps", impl="ldm", variant=tag, gpu_kernel_ms=total,
         by_category_ms=cats, kernels=top[:10], timeline=timeline)
    syncs = host_syncs(run)
    emit(out, what=f"txt2img_host_syncs_{px}px_{steps}steps", impl="ldm", variant=tag, count=sum(syncs.values()),
         where=dict(sorted(syncs.items(), key=lambda kv: -kv[1])[:10]))


def compile_both(ours, pipe, mode: str, out, diffusers_mode: str | None = None,
                 compile_text: bool | str = "graph") -> None:
    """Our fast path with ``mode`` (``compile_text``: see ``ldm.fast.optimize``) and diffusers at its
    best (channels_last, fused q/k/v, compiled U-Net and decoder; its text encoder eager) with ``diffusers_mode``
    (default: the same)."""
    from ldm.fast import optimize

    t0 = time.time()
    dmode = diffusers_mode or mode
    # cuDNN attention on Hopper, fused projections, inductor flags (process-wide: both); a candidate's settings for
    # our graphs alone
    optimize(ours, mode=mode, options=dict(OURS_OPTIONS) or None, compile_text=compile_text)
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    pipe.fuse_qkv_projections()
    pipe.unet = torch.compile(pipe.unet, mode=dmode, fullgraph=True)
    pipe.vae.decode = torch.compile(pipe.vae.decode, mode=dmode, fullgraph=True)
    import torch._inductor.config as inductor_config

    # compile_threads and the Python version: the autotuner's reports read "0.0003 seconds precompiling" with 1 and
    # with 16 compile threads alike (docs/BENCHMARKS.md, fourth and fifth 11-29 sessions)
    emit(out, what="compile_setup_s", value=time.time() - t0, mode=mode, diffusers_mode=dmode,
         compile_text=compile_text,
         ours_options=dict(OURS_OPTIONS), compile_threads=inductor_config.compile_threads,
         python=sys.version.split()[0])


TEXT_FLAGS = {"graph": "graph", "compile": True, "eager": False}  # --text -> optimize(compile_text=...)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="tiny config on the CPU")
    p.add_argument("--config", default=None)
    p.add_argument("--only", default="attention,unet,vae,pipeline,train,profile",
                   help="comma list of: attention, attention_train, unet, vae, pipeline, train, profile, layers, "
                        "unet_profile (profile's U-Net step alone); the matmul ceiling is always measured on a GPU")
    p.add_argument("--compile", action="store_true", help="also time the compiled inference variants")
    p.add_argument("--skip-eager", action="store_true", help="compiled inference variants only (a cache probe)")
    p.add_argument("--compile-train", action="store_true", help="also time our compiled training step")
    p.add_argument("--compile-train-diffusers", action="store_true",
                   help="and diffusers' compiled training step (its first step compiles for minutes)")
    p.add_argument("--train-shapes", default=None,
                   help="training rows as LATENTxBATCH items (default: latents px/16 at batch 32 and px/8 at batch 16, "
                        "32x32,64x16 at --px 512; on the CPU 4x4)")
    p.add_argument("--compile-train-shapes", default=None, help="compiled training rows (default: --train-shapes)")
    p.add_argument("--compile-train-diffusers-shapes", default=None,
                   help="diffusers' compiled training rows (default: --compile-train-shapes)")
    p.add_argument("--train-impls", default="ldm,diffusers", help="eager training rows of: ldm, diffusers")
    p.add_argument("--train-cl", action="store_true", help="training in channels_last (weights and latents)")
    p.add_argument("--train-attn", default=None, help="our attention backend in the training rows (sdpa, cudnn, flash)")
    p.add_argument("--attn", default=None, help="our attention backend in the compiled inference rows "
                   "(ldm.attention.BACKENDS: fa4, ...; default: the config's), named in their variant; the eager "
                   "rows, which the compiled ones are compared with, keep the config's")
    p.add_argument("--train-inner", type=int, default=1, metavar="N",
                   help="also time N training steps back to back per repetition (a training loop's throughput)")
    p.add_argument("--train-compile-mode", default=None, metavar="MODE",
                   help="torch.compile mode of our compiled training rows (train.compile_mode), e.g. reduce-overhead: "
                        "the forward and backward replayed from CUDA graphs")
    p.add_argument("--train-cudnn-benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark in the training rows (Lightning's Trainer(benchmark=True))")
    p.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                   help="set torch._inductor.config.KEY (a Python literal) for the whole run, both sides, e.g. "
                        "coordinate_descent_tuning=True or force_layout_optimization=True; repeatable")
    p.add_argument("--ours-inductor", action="append", default=[], metavar="KEY=VALUE",
                   help="an inductor setting for our compiled inference graphs alone (diffusers runs without it, "
                        "in the same process), e.g. combo_kernels=True; repeatable")
    p.add_argument("--candidate", action="append", default=[], choices=sorted(CANDIDATES),
                   help="a change under test for our compiled inference graphs, or training graphs "
                        "(gn-nhwc-train; scripts/bench_candidates.py); "
                        "repeatable")
    p.add_argument("--attn-train-batches", default="64", type=parse_ints,
                   help="batches of the attention_train rows, e.g. 32,64")
    p.add_argument("--mode", default="reduce-overhead", help="torch.compile mode for both sides")
    p.add_argument("--diffusers-mode", default=None,
                   help="diffusers' torch.compile mode where it differs from --mode (issue 7 defines diffusers at its "
                        "best with reduce-overhead)")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark for the whole run, both sides (cuDNN times its algorithms "
                        "for each convolution shape on first use)")
    p.add_argument("--blas", default=None, choices=("cublas", "cublaslt"),
                   help="torch.backends.cuda.preferred_blas_library for the whole run, both sides (default: torch's "
                        "own choice)")
    p.add_argument("--batch8", action="store_true", help="also txt2img at batch 8 (--pipeline-batches 1,8)")
    p.add_argument("--pipeline-batches", default="1", type=parse_ints,
                   help="comma-separated txt2img batch sizes, in order (default 1; a batch alone compiles its shapes "
                        "first, so its first-call row is a cold compile)")
    p.add_argument("--px", type=int, default=512,
                   help="image size of the inference rows on a GPU (latents px/8; SD-1.5's native 512)")
    p.add_argument("--text", default="graph", choices=sorted(TEXT_FLAGS),
                   help="our text encoder in the compiled variants: graph (its eager kernels replayed from a CUDA "
                        "graph, the default), compile (torch.compile, the U-Net's mode), eager; "
                        "ldm.fast.optimize(compile_text='graph' | True | False)")
    p.add_argument("--no-denoiser-graph", action="store_true",
                   help="with --compile, leave out the compiled_denoiser variant (the guided denoiser as one graph)")
    p.add_argument("--eager-nchw", action="store_true",
                   help="also our eager rows with NCHW weights (the eager rows use channels_last, as ldm.load gives)")
    p.add_argument("--vae-stats", type=parse_names, default=(),
                   help="comma-separated GroupNorm statistics methods (ldm.norm.STATS_METHODS) to time our decoder "
                        "with beside its default, in the same process: the vae rows' <variant>_vae-<method>")
    p.add_argument("--eager-graph", action="store_true",
                   help="also our eager U-Net and text encoder replayed from CUDA graphs, no compiler "
                        "(ldm.fast.optimize(compile=False, unet_graph=True)): the eager_graph rows")
    p.add_argument("--unet-calls", default=",".join(UNET_CALLS),
                   help=f"the U-Net rows' calls, of {', '.join(UNET_CALLS)} (each one left out is a compile saved)")
    p.add_argument("--out", default=None)
    p.add_argument("--label", default=None,
                   help="a name every row carries beside its command line, e.g. 'A (machine 3)'")
    return p


def check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> set[str]:
    """The checks that need no model or GPU (p.error names the argument); returns the --only items. Sets a.unet_calls
    to a tuple."""
    only = set(a.only.split(","))
    unknown = only - {"ceiling", "attention", "attention_train", "unet", "vae", "pipeline", "train", "profile",
                      "unet_profile", "layers"}
    if unknown:
        p.error(f"--only: unknown item(s) {', '.join(sorted(unknown))}")
    a.unet_calls = tuple(a.unet_calls.split(","))
    if set(a.unet_calls) - set(UNET_CALLS):
        p.error(f"--unet-calls: unknown call(s) {', '.join(sorted(set(a.unet_calls) - set(UNET_CALLS)))}; "
                f"known: {', '.join(UNET_CALLS)}")
    if a.px < 64 or a.px % 64:
        p.error(f"--px must be a positive multiple of 64 (the U-Net halves the latent three times), got {a.px}")
    unknown_impls = {i for i in a.train_impls.split(",") if i} - {"ldm", "diffusers"}
    if unknown_impls:  # (any name but ldm ran diffusers' U-Net under that name)
        p.error(f"--train-impls: unknown {', '.join(sorted(unknown_impls))}; known: ldm, diffusers")
    if a.train_inner < 1:
        p.error(f"--train-inner must be at least 1, got {a.train_inner}")
    for shapes in (a.train_shapes, a.compile_train_shapes, a.compile_train_diffusers_shapes):
        parse_shapes(shapes or "")  # checked before minutes of model building
    return only


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    describe_run("scripts/bench.py", argv, a.label)
    only = check_args(p, a)
    for backend in (a.train_attn, a.attn):
        if backend is not None:
            from ldm.attention import check_backend

            check_backend(backend)
    for item in a.inductor:
        try:
            set_inductor_option(item)
        except ValueError as e:
            p.error(str(e))
    for item in a.ours_inductor:
        try:
            set_ours_option(item)
        except ValueError as e:
            p.error(str(e))
    for name in a.candidate:
        apply_candidate(name)
    out = Path(a.out) if a.out else None
    cpu = a.cpu or not torch.cuda.is_available()
    device, dtype = ("cpu", torch.float32) if cpu else ("cuda", torch.float16)
    config = a.config or ("configs/tiny/txt2img.yaml" if cpu else "sd/v1-inference.yaml")
    global SD_SHAPES
    SD_SHAPES = config in ("sd/v1-inference.yaml", "configs/sd/v1-inference.yaml")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = a.cudnn_benchmark
    if a.blas and not cpu:
        torch.backends.cuda.preferred_blas_library(a.blas)
    res, px = (8, 32) if cpu else (a.px // 8, a.px)
    if not cpu:  # always (a few seconds): every TFLOP/s row then also reports its share of this ceiling
        bench_ceiling(out)
    if not cpu and only & {"profile", "unet_profile"}:
        bench_launch_floor(out)
    if not cpu and "attention" in only:
        bench_attention(out)
    if not cpu and "attention_train" in only:
        for b in a.attn_train_batches:
            bench_attention(out, batch=b, train=True)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        ours, pipe = build(config, device, dtype, Path(tmp))
        emit(out, what="build_s", value=time.time() - t0, config=config)
        own_attn = ours.unet.attn_backend
        check_same_function(ours, pipe, res, out, dtype)
        if "train" in only:  # training first: compiling for inference below rewrites the modules' forward
            run_train_rows(ours, pipe, res, cpu, a, out)
        eager = ["eager"] + (["eager_nchw"] if a.eager_nchw else []) + (["eager_graph"] if a.eager_graph else [])
        variants = ([] if a.skip_eager else eager) + (
        ["compiled"] + ([] if a.no_denoiser_graph else ["compiled_denoiser"]) if a.compile else [])
        for tag in variants:
            ours.unet.set_attention_backend(a.attn if a.attn and tag.startswith("compiled") else own_attn)
            run_variant(ours, pipe, tag, res, px, cpu, only, a, out)
    summary()
    return 0


def vae_compile_kwargs(a: argparse.Namespace) -> dict:
    """torch.compile's arguments for our decoder, as ``ldm.fast.optimize`` gives them in this run."""
    from ldm.fast import compile_kwargs

    return compile_kwargs("inductor", a.mode, dict(OURS_OPTIONS) or None, fullgraph=True, dynamic=False)


OURS_ONLY = ("compiled_denoiser", "eager_nchw", "eager_graph")  # variants of ours alone (no diffusers or VAE rows)


def run_variant(ours, pipe, tag: str, res: int, px: int, cpu: bool, only: set, a, out) -> None:
    """One inference variant: "eager", "eager_nchw" (ours only, NCHW weights), "eager_graph" (ours only: the eager
    U-Net and text encoder replayed from CUDA graphs), "compiled" (U-Net and decoder, both sides) or
    "compiled_denoiser" (ours only: the whole guided denoiser of a step as one graph,
    ``ldm.fast.optimize(scope="denoiser")``)."""
    from ldm.fast import compile_guided_denoiser, eager_text_encoder, graph_text_encoder, graph_unet, ungraph_unet

    if tag == "compiled":
        compile_both(ours, pipe, a.mode, out, a.diffusers_mode, compile_text=TEXT_FLAGS[a.text])
    if tag == "compiled_denoiser":
        compile_guided_denoiser(ours, backend="inductor", mode=a.mode, fullgraph=True, dynamic=False)
    if tag == "eager_graph":
        graph_unet(ours.unet)
        graph_text_encoder(ours.cond_stage_model)
    impls = ("ldm",) if tag in OURS_ONLY else ("ldm", "diffusers")
    steps = 50 if not cpu else 4
    was = layout_of(ours.unet)
    if tag == "eager_nchw":
        ours.unet.to(memory_format=torch.contiguous_format)
        ours.vae.to(memory_format=torch.contiguous_format)
    label = inference_tag(tag, a.mode, a.diffusers_mode, a.text, a.attn)  # the rows' variant name
    if "unet" in only and tag != "compiled_denoiser":
        bench_unet(ours, pipe, res, out, label, impls, a.unet_calls)
    if "vae" in only and tag not in OURS_ONLY:
        bench_vae(ours, pipe, res, out, label, a.vae_stats, vae_compile_kwargs(a) if tag == "compiled" else None)
    if "pipeline" in only:  # before the profiles: its first call is the compile
        for batch in pipeline_batches(a):
            bench_pipeline(ours, pipe, px, batch, steps, out, label, impls)
    if ("profile" in only or "unet_profile" in only) and not cpu and tag != "compiled_denoiser":
        profile_unet(ours, pipe, res, out, label)
    if "profile" in only and not cpu:
        if "vae" in only and tag not in OURS_ONLY:
            profile_vae(ours, pipe, res, out, label)
        profile_pipeline(ours, px, 50, out, label)
    if "layers" in only and not cpu and tag == "eager":
        bench_layers(ours, pipe.unet.config.cross_attention_dim, res, out)
    ours.unet.to(memory_format=was)
    ours.vae.to(memory_format=was)
    if tag == "eager_graph":
        ungraph_unet(ours.unet)
        eager_text_encoder(ours.cond_stage_model)  # eager again for the next variant


def parse_ints(text: str) -> list[int]:
    """``"1,8"`` -> [1, 8]; an empty item or a non-positive number is an error that names the text."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"batch sizes must be positive, got {text!r}")
    return values


def parse_names(text: str) -> tuple[str, ...]:
    """``"shifted,partial"`` -> ("shifted", "partial"), each checked against ``ldm.norm.STATS_METHODS``."""
    from ldm.norm import STATS_METHODS

    names = tuple(n for n in text.split(",") if n)
    unknown = [n for n in names if n not in STATS_METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown statistics method(s) {', '.join(unknown)}; known: "
                                         f"{', '.join(STATS_METHODS)}")
    return names


def pipeline_batches(a: argparse.Namespace) -> list[int]:
    """The txt2img batch sizes to time: --pipeline-batches, with 8 appended by --batch8."""
    return a.pipeline_batches + ([8] if a.batch8 and 8 not in a.pipeline_batches else [])


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """"32x32,64x16" -> [(latent side, batch), ...]."""
    try:
        return [(int(r), int(b)) for r, b in (item.split("x") for item in text.split(",") if item)]
    except ValueError:
        raise SystemExit(f"--train-shapes/--compile-train-shapes: expected LATENTxBATCH items like 32x32,64x16, "
                         f"got {text!r}") from None


def run_train_rows(ours, pipe, res: int, cpu: bool, a, out) -> None:
    """Eager rows (default 256 and 512 px, ours and diffusers), then the compiled ones, shape change included. The
    optimizer steps change both U-Nets' weights, each its own way: they get their weights back afterwards, so that
    the inference rows after these compare the same functions."""
    saved = {name: unet_weights(net) for name, net in (("ldm", ours.unet), ("diffusers", pipe.unet))}
    backend_was, benchmark_was = ours.unet.attn_backend, torch.backends.cudnn.benchmark
    if a.train_attn:
        ours.unet.set_attention_backend(a.train_attn)
    torch.backends.cudnn.benchmark = a.train_cudnn_benchmark or benchmark_was
    shapes = parse_shapes(a.train_shapes) if a.train_shapes else [(res // 2, 32 if not cpu else 4)] + (
        [(res, 16)] if not cpu else [])
    prof = "profile" in a.only.split(",")  # (not unet_profile: the U-Net's inference step alone)
    for r, b in shapes:
        bench_train(ours, pipe, r, b, out, impls=[i for i in a.train_impls.split(",") if i], profile=prof,
                    channels_last=a.train_cl, inner=a.train_inner)
    impls = (["ldm"] if a.compile_train else []) + (["diffusers"] if a.compile_train_diffusers else [])
    cshapes = parse_shapes(a.compile_train_shapes) if a.compile_train_shapes else shapes
    dshapes = parse_shapes(a.compile_train_diffusers_shapes) if a.compile_train_diffusers_shapes else cshapes
    for impl in impls:  # ours first: diffusers' first compiled step takes minutes
        for r, b in (cshapes if impl == "ldm" else dshapes):
            bench_train(ours, pipe, r, b, out, impls=(impl,), compiled=True, profile=prof, channels_last=a.train_cl,
                        inner=a.train_inner, mode=a.train_compile_mode if impl == "ldm" else None)
    uncompile(ours.unet)
    uncompile(pipe.unet)
    ours.unet.set_attention_backend(backend_was)
    torch.backends.cudnn.benchmark = benchmark_was
    if not cpu:
        ours.half()
        pipe.unet.half()
    ours.unet.load_state_dict(saved["ldm"])
    pipe.unet.load_state_dict(saved["diffusers"])


def unet_weights(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``net``'s state dict in host memory (so that holding it adds nothing to the GPU's peak memory)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}


if __name__ == "__main__":
    sys.exit(main())
