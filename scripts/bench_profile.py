"""Where the GPU time of a step goes (torch.profiler: kernel categories, top kernels, the operators behind layout
copies) and where the host waits for it (synchronising CUDA calls by source line)."""
from __future__ import annotations

import math
import statistics
from pathlib import Path

import torch

KERNEL_CATEGORIES = (  # first match wins; names of cuDNN, cuBLAS, CUTLASS, flash and Triton kernels. Triton first:
    # inductor names its kernels after the ops they fuse ("triton_poi_fused_add_convolution_..." is a conv's epilogue;
    # rows before 2026-12-03 counted those under "convolution")
    ("norm / elementwise (Triton)", ("triton",)),
    # cuDNN's SDPA backward runs two helper kernels beside its flash kernel, "cudnn::fusion::compute_dot_do_o" and
    # "cudnn::fusion::convert_dq_to_16bits" (rows before 2026-12-06, eighth session, counted them as "other" and,
    # through "convert", as "convolution": 5.3 ms each in the H100's 512 px step)
    ("attention", ("flash", "fmha", "sdpa", "attention", "softmax", "cudnn::fusion")),
    ("convolution", ("conv", "implicit", "fprop", "dgrad", "wgrad", "nchw", "nhwc")),
    ("matmul", ("gemm", "cutlass", "nvjet", "matmul", "xmma", "mm_")),
    ("optimizer / foreach", ("multi_tensor", "foreach", "adam")),
    ("copy / layout", ("copy", "memcpy", "memset", "transpose", "cat")),
)


def kernel_category(name: str) -> str:
    low = name.lower()
    return next((c for c, keys in KERNEL_CATEGORIES if any(k in low for k in keys)), "other")


def is_annotation(key: str) -> bool:
    """Ranges that the profiler lists on the GPU timeline beside the kernels they contain (compiled graphs, optimizer
    steps): counting them would count those kernels twice."""
    return key.startswith(("## ", "Optimizer."))


def profile_step(fn, steps: int = 10, ops: list | None = None, timeline: dict | None = None,
                 top_n: int = 12) -> tuple[float, dict[str, float], list[dict]]:
    """GPU kernel time of ``fn()`` per call (ms), by kernel category, and the top kernels (torch.profiler).
    ``ops``: if a list, the copy-like ATen ops and the operators that called them are appended to it (copy_sources).
    ``timeline``: if a dict, it is filled with the GPU timeline's launches and idle gaps (timeline_summary).
    ``top_n``: how many kernels the top list holds, heaviest first."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    acts = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if ops is not None else [])
    with profile(activities=acts, record_shapes=ops is not None) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    if timeline is not None:
        timeline.update(timeline_summary(prof.events(), steps))
    return kernel_summary(prof, steps, ops, top_n)


def timeline_summary(events, steps: int) -> dict:
    """The GPU timeline of ``steps`` calls: kernels launched per call, busy and idle time per call (idle = the gaps
    between one kernel's end and the next one's start, inside the profiled span), the median gap, and the idle time
    by the category of the kernel that waited (a launch-bound graph spreads it evenly; a host-bound one piles it up
    before a few kernels)."""
    spans = sorted((e.time_range.start, e.time_range.end, kernel_category(e.name)) for e in events
                   if e.device_type.name == "CUDA" and not is_annotation(e.name))
    if not spans:
        return {}
    gaps, busy, idle_by_cat, count_by_cat, end = [], 0.0, {}, {}, spans[0][0]
    for start, stop, cat in spans:
        count_by_cat[cat] = count_by_cat.get(cat, 0) + 1 / steps
        gap = max(start - end, 0.0)
        gaps.append(gap)
        idle_by_cat[cat] = idle_by_cat.get(cat, 0.0) + gap
        busy += max(stop - max(start, end), 0.0)
        end = max(end, stop)
    ordered = sorted(gaps[1:]) or [0.0]  # (the first kernel waits for nothing in the span)
    return {"launches_per_call": len(spans) / steps, "busy_ms_per_call": round(busy / steps / 1000, 3),
            "idle_ms_per_call": round(sum(gaps) / steps / 1000, 3),
            "median_gap_us": round(statistics.median(ordered), 2),
            "p90_gap_us": round(ordered[math.ceil(len(ordered) * 0.9) - 1], 2),  # nearest rank
            "launches_by_category": {k: round(v, 1) for k, v in sorted(count_by_cat.items(), key=lambda kv: -kv[1])},
            "idle_ms_by_next_category": {k: round(v / steps / 1000, 3) for k, v in
                                         sorted(idle_by_cat.items(), key=lambda kv: -kv[1])}}


def kernel_summary(prof, steps: int, ops: list | None = None,
                   top_n: int = 12) -> tuple[float, dict[str, float], list[dict]]:
    """A finished profile's GPU kernel time per step (ms), by category, and its top kernels (see profile_step)."""
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and not is_annotation(e.key)]
    by_cat: dict[str, float] = {}
    for e in kernels:
        cat = kernel_category(e.key)
        by_cat[cat] = by_cat.get(cat, 0.0) + float(e.device_time_total) / steps / 1000
    top = sorted(kernels, key=lambda e: -float(e.device_time_total))[:top_n]
    top_rows = [{"name": e.key[:120], "category": kernel_category(e.key),
                 "ms_per_step": round(float(e.device_time_total) / steps / 1000, 3),
                 "calls_per_step": e.count / steps} for e in top]
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


def conv_backward_layouts(loss_fn) -> list[dict]:
    """Each ``aten.convolution_backward`` that the backward of ``loss_fn()`` runs (a compiled backward calls it as an
    extern kernel), with its arguments' shapes and strides as they arrive, grouped and counted. Only the backward
    runs under the recording mode: a compiled forward run under a dispatch mode takes another path (on the CPU its
    backward then passed NCHW gradients that the unrecorded step does not). ``converts``: cuDNN's backward first
    converts the incoming gradient to the input's suggested memory format (``cudnn_convolution_backward``: the
    ``_to_copy`` the profiles attribute to ``convolution_backward``, made only where the gradient is not laid out
    that way already: a (B, C, 1, 1) map is both), so a row with ``converts`` true is one of those copies, and its
    strides say which side is NCHW. An empty list from a step with a backward means the mode did not
    reach it."""
    from torch._prims_common import suggest_memory_format
    from torch.utils._python_dispatch import TorchDispatchMode

    op = torch.ops.aten.convolution_backward.default
    rows: dict[tuple, int] = {}

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is op:
                g, x, w = args[:3]
                converts = not g.is_contiguous(memory_format=suggest_memory_format(x))  # what .to() copies
                key = (tuple(g.shape), tuple(w.shape), g.stride(), x.stride(), w.stride(), converts)
                rows[key] = rows.get(key, 0) + 1
            return func(*args, **(kwargs or {}))

    loss = loss_fn()
    with Record():
        loss.backward()
    return [{"grad_output_shape": list(gs), "weight_shape": list(ws), "grad_output_stride": list(gst),
             "input_stride": list(xst), "weight_stride": list(wst), "converts": conv, "calls": n}
            for (gs, ws, gst, xst, wst, conv), n in rows.items()]


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
