"""What every benchmark script shares: one JSON line per result (``emit``), CUDA-event timing (``timed``), the
card's measured matmul ceiling that TFLOP/s rows are shares of, and the closing table."""
from __future__ import annotations

import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS: list[dict] = []  # every row emitted in this process, for the closing table
CEILING: dict[str, float] = {}  # the matmul rate measured in this run (TFLOP/s), measured first on a GPU
RUN: dict[str, str] = {}  # fields every row of this process carries (the command that made it, a label)


def describe_run(script: str, argv: list[str] | None, label: str | None = None) -> None:
    """Make every row of this process name the command that made it (``argv``: a main's arguments, None for the
    command line's; and ``label``, e.g. "A (machine 3)"), so that rows collected from several processes stay
    attributable."""
    RUN.clear()
    RUN["command"] = shlex.join(["python", script, *(sys.argv[1:] if argv is None else argv)])
    if label:
        RUN["label"] = label


def emit(out: Path | None, **kw) -> None:
    if isinstance(kw.get("tflops"), float) and CEILING:  # (the ceiling row itself comes before CEILING is set)
        kw["share_of_ceiling"] = round(kw["tflops"] / CEILING["tflops"], 3)
    kw["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    kw["torch"] = torch.__version__
    kw.update(RUN)
    print(json.dumps(kw), flush=True)
    RESULTS.append(kw)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(kw) + "\n")


# torch's compile-phase timers (``torch._dynamo.utils.compilation_time_metrics`` keys) that the first-call rows
# break down: where a cold compile goes and what a cached one still pays.
COMPILE_PHASES = {"compile": "_compile.compile_inner",  # all of it, per frame: the phases below and the rest
                  "dynamo_trace": "bytecode_tracing", "aot": "create_aot_dispatcher_function",
                  "lowering": "GraphLowering.run", "scheduling": "Scheduler.__init__",
                  "codegen": "GraphLowering.codegen", "kernel_compile_wait": "async_compile.wait",
                  "guards": "build_guards"}


def compile_counters() -> dict[str, float]:
    """Seconds spent so far in this process in each of :data:`COMPILE_PHASES`, and the counts of inductor's FX graph
    cache and AOT autograd's cache hits and misses."""
    from torch._dynamo.utils import compilation_time_metrics, counters

    snap = {name: float(sum(compilation_time_metrics.get(key, ()))) for name, key in COMPILE_PHASES.items()}
    for group in ("inductor", "aot_autograd"):
        snap.update({key: float(n) for key, n in counters[group].items() if "cache" in key})
    return snap


def compile_breakdown(before: dict[str, float]) -> dict[str, float]:
    """What happened since ``before`` (a :func:`compile_counters`): seconds per phase, cache hits and misses;
    phases that did not run are left out."""
    return {key: round(v - before.get(key, 0.0), 3) for key, v in compile_counters().items()
            if v > before.get(key, 0.0)}


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


def graph_time_us(fn, calls: int = 20, reps: int = 9) -> float:
    """Median µs per call of ``fn`` over replays of one CUDA graph holding ``calls`` back-to-back calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up (compiles) outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return sorted(times)[reps // 2]


def bench_ceiling(out) -> float:
    """The card's measured bf16 matmul rate (8192³, TFLOP/s): the ceiling the U-Net's rates are shares of."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    r = timed(lambda: a @ b, 5, 20)
    tf = 2 * 8192**3 / r["median_s"] / 1e12
    emit(out, what="matmul_ceiling_bf16_8192", tflops=tf, **r)
    CEILING["tflops"] = tf
    return tf


def bench_launch_floor(out, n: int = 500) -> float:
    """µs per kernel of a CUDA graph of ``n`` tiny kernels replayed back to back: what each launch of a captured step
    costs at least (a kernel's own few cycles plus the graph's gap before the next), to set against a profile's
    launch count and idle time."""
    x = torch.zeros(256, device="cuda")
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        x.add_(1)  # warm-up outside the capture
        with torch.cuda.graph(g, stream=s):
            for _ in range(n):
                x.add_(1)
    torch.cuda.current_stream().wait_stream(s)
    r = timed(g.replay, 3, 20)
    us = r["median_s"] / n * 1e6
    emit(out, what="cuda_graph_us_per_kernel", value=us, kernels=n, **r)
    return us


def summary() -> None:
    print("\nSUMMARY")
    for r in RESULTS:
        keys = ("median_s", "value", "img_per_s", "tflops", "share_of_ceiling", "peak_mem_gb", "total_ms_per_step")
        print(f"{r['what']:<40} {r.get('impl', ''):<10} {r.get('variant', ''):<9} " +
              " ".join(f"{k}={r[k]:.4g}" for k in keys if isinstance(r.get(k), float)))
