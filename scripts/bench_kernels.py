"""Single kernels at SD-1.5 shapes: attention (each SDPA kernel and ours, inference or training) and every distinct
convolution and linear layer of one CFG U-Net call (cuDNN heuristic against autotuning, fp16 against fp8)."""
from __future__ import annotations

import sys

import torch
from bench_common import emit, graph_time_us, timed

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
    ours = ("sdpa", "cudnn", "flash") + (("fa4",) if not train and fa4_installed() else ())  # fa4: no backward
    totals: dict[str, float] = {}
    graphed: dict[str, float] = {}  # the same, from CUDA-graph replays (inference only)
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
        impls.update({f"ldm:{b}": (lambda b=b: attention(q, k, v, backend=b)) for b in ours})
        for impl, fn in impls.items():
            try:
                diff = float((call(fn).detach().float() - ref.detach()).abs().max())
                r = timed(lambda fn=fn: call(fn), 3, 30)
            except RuntimeError as e:  # no kernel of this kind for the shape on this card
                emit(out, what=f"{what}_{name}", impl=impl, batch=batch, error=str(e).splitlines()[0][:200])
                continue
            totals[impl] = totals.get(impl, 0.0) + layers * r["median_s"] * 1e3
            picks = {"sdpa_picks": sdpa_pick(q, k, v)} if impl == "ldm:sdpa" else {}
            emit(out, what=f"{what}_{name}", impl=impl, batch=batch, tflops=gflop / r["median_s"] / 1e3,
                 max_abs_diff=diff, **picks, **r)
            if not train and q.is_cuda:  # the kernels alone, as a compiled U-Net's CUDA graph replays them
                us = graph_time_us(lambda fn=fn: call(fn))
                graphed[impl] = graphed.get(impl, 0.0) + layers * us / 1e3
                emit(out, what=f"{what}_graphed_{name}", impl=impl, batch=batch, us_per_call=us,
                     tflops=gflop / us * 1e3)
    emit(out, what=f"{what}_unet_pass_ms", batch=batch, by_impl_ms=totals)
    if graphed:
        emit(out, what=f"{what}_graphed_unet_pass_ms", batch=batch, by_impl_ms=graphed)


def sdpa_pick(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """The kernel plain SDPA selects for these inputs in this process (its default order; no kernel runs)."""
    from torch.nn.attention import SDPBackend

    try:
        return SDPBackend(torch._fused_sdp_choice(q, k, v)).name
    except RuntimeError as e:
        return f"none: {str(e).splitlines()[0][:120]}"


def fa4_installed() -> bool:
    """Whether the ``fa4`` attention backend can be imported here (its rows are left out otherwise, said once)."""
    from ldm.attention import AttentionBackendError, check_backend

    try:
        check_backend("fa4")
    except AttentionBackendError as e:
        print(f"bench: no fa4 rows: {e}", file=sys.stderr)
        return False
    return True


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
    if not x2d.is_cuda or not hasattr(torch, "_scaled_mm") or torch.cuda.get_device_capability() < (8, 9) or \
            x2d.shape[1] % 16 or w.shape[0] % 16:
        return None
    a = x2d.to(torch.float8_e4m3fn)
    b = w.to(torch.float8_e4m3fn).t()  # (K, N), column-major as _scaled_mm wants
    one = torch.ones((), device=x2d.device)
    return lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.float16)


@torch.no_grad()
def bench_layers(ours, ctx_dim: int, res: int, out) -> None:
    """Each distinct convolution and linear shape of one CFG U-Net call, alone (fp16, channels_last): time, TFLOP/s,
    times its count. Convolutions with cuDNN's heuristic and with ``cudnn.benchmark`` (the run's own setting is put
    back afterwards); linears also as fp8 (on a GPU with fp8 tensor cores)."""
    benchmark_was = torch.backends.cudnn.benchmark
    try:
        _bench_layers(ours, ctx_dim, res, out)
    finally:
        torch.backends.cudnn.benchmark = benchmark_was


def _bench_layers(ours, ctx_dim: int, res: int, out) -> None:
    import torch.nn.functional as F

    dev = ours.device
    x = torch.randn(2, 4, res, res, device=dev, dtype=ours.dtype)
    t = torch.tensor([500, 500], device=dev)
    c = torch.randn(2, 77, ctx_dim, device=dev, dtype=ours.dtype)
    groups: dict[tuple, list] = {}
    for m, shape in layer_calls(ours.unet, lambda: ours.unet(x, t, context=c)):
        key = (type(m).__name__, shape, tuple(m.weight.shape), getattr(m, "stride", None), getattr(m, "padding", None))
        groups.setdefault(key, [m, 0])[1] += 1
    totals: dict[str, float] = {}
    for (kind, shape, wshape, _, _), (m, n) in groups.items():
        inp = torch.randn(shape, device=dev, dtype=torch.float16)
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
