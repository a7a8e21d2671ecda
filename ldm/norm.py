"""GroupNorm that keeps a channels_last input in channels_last when compiled.

Why: PyTorch's ``native_group_norm`` returns NCHW strides whatever its input's layout. Under ``torch.compile``
those strides are what AOT autograd records for every activation the forward saves for the backward (the norm's
output, the SiLU after it, the bf16 copy the next convolution reads), and inductor keeps them at that boundary.
The backward's ``convolution_backward`` then converts each saved input to the weights' channels_last layout inside
the ATen op, a copy inductor cannot fuse: 28 ms of a 445 ms SD-1.5 training step at 512 px and batch 64 on one
H200 (docs/BENCHMARKS.md). Asking for the input's layout on the output makes the recorded strides channels_last;
inductor writes the norm's Triton kernel in that layout directly, so the request costs no kernel of its own.

Compiled inference (no autograd) goes further: ``native_group_norm``'s lowering first makes its input NCHW-contiguous,
and inductor wrote 8 of SD-1.5's 12 skip concatenations in NCHW for it, then read them back channel-fastest in the
normalizing kernel, 10-57 µs each on an H200 where a coalesced pass takes a few (docs/BENCHMARKS.md, 2026-12-03,
second session). :func:`group_norm_nhwc` computes the same numbers on the channels_last memory as it is: statistics
over a (B, H·W, G, C/G) view, the normalization on (B, H, W, C). Its reshape would let inductor choose the input's
layout when the input is a buffer not yet written (a concatenation), and inductor chose NCHW, so it first asks for
channels_last strides with inductor's stride-order prim (:func:`force_channels_last`): a no-op when the input
already has them, the layout of the write when it has none yet, a copy only if another consumer fixed NCHW first.
Training graphs keep
``native_group_norm`` by default (:data:`NHWC_TRAINING`): its backward kernel was faster than a ``var_mean`` GroupNorm's
(fifth 11-29 session). On CUDA, though, inductor's fused kernels of its backward write the input's gradient NCHW
(third 11-29 session, from the output code), and ``convolution_backward`` converts it for cuDNN: 54 copies, 16.9 ms
of a 456 ms SD-1.5 step at 512 px on an H100 (2026-12-05, fifth session). Differentiating :func:`group_norm_nhwc`
instead derives every gradient on the NHWC view, with no ``native_group_norm_backward`` left to lower: the copies go,
but its backward's reductions are slower than the copies they save (``scripts/bench_block_train.py``, two first-level
ResBlocks at batch 64 on an H100: 24.9 against 20.6 ms per step, Triton 12.8 against 7.4 ms). So :data:`NHWC_TRAINING`
stays off; ``scripts/bench.py --candidate gn-nhwc-train`` measures it again.

A hand-written Triton GroupNorm (+ SiLU) as one torch op, in place of inductor's lowering, made SD-1.5's CFG step
slower on an H100 (7.11 against 5.97 ms; docs/BENCHMARKS.md, 2026-12-06 eleventh session): inductor fuses each norm's
kernels with the additions, casts and concatenations around it, and an opaque op breaks those fusions.

Eager mode is left exactly as ``nn.GroupNorm``: there the CUDA kernel converts anyway, and an extra request would
add a copy. The numbers are the same either way (only strides differ); parameters and state-dict keys are those of
``nn.GroupNorm``, so checkpoints load unchanged.
"""
from __future__ import annotations

import functools

import torch
from torch import nn


def is_channels_last(x: torch.Tensor) -> bool:
    """A 4-D tensor laid out NHWC (and not also NCHW-contiguous, as 1×1 maps or single channels are)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


# Compiled inference graphs normalize a channels_last input with :func:`group_norm_nhwc` (False: native_group_norm,
# as training graphs do; scripts/bench.py's ``--candidate gn-native`` measures the difference).
NHWC_INFERENCE = True
# Compiled training graphs (grad enabled) normalize a channels_last input with :func:`group_norm_nhwc` too, so that
# the backward's gradients keep channels_last strides (False, the default: native_group_norm, faster in the step; the
# module docstring).
NHWC_TRAINING = False
# How group_norm_nhwc computes μ and σ²: "partial" (the default), "shifted" or "welford".
# - "shifted": sums of x - K and (x - K)² in one loop, K one value of the group hoisted out of it, so no cancellation
#   unless the group's spread is far below its distance from K. Inductor gives each (sample, group) one reduction
#   program that reads C/G values out of every C (10 of 320): 32-64 programs at 0.2-0.7 TB/s on an H200.
# - "partial": the same shifted sums over STATS_PARTS runs of rows first, B·parts·G programs (256 in SD's CFG batch),
#   then the parts added term by term (inductor writes μ and 1/σ per group in one small kernel). Its statistics
#   kernels took 0.17 ms of the SD-1.5 CFG step against 0.26, and the step ran 5.76 ms against 5.86 (shifted), same
#   H200, same process as diffusers' 6.34 (docs/BENCHMARKS.md, 2026-12-04). ``--candidate gn-shifted`` gives the
#   one-step sums, ``gn-partial8`` eight parts.
# - "welford": torch.var_mean, inductor's Welford loop (a division per value): 1.0-1.5% slower than "shifted"
#   (``--candidate gn-welford``, 12-03).
NHWC_STATS = "partial"
STATS_METHODS = ("partial", "shifted", "welford")
STATS_PARTS = 4


def check_stats_method(method: str, where: str) -> str:
    """``method`` when it is one of :data:`STATS_METHODS`; otherwise a ValueError naming ``where`` it was set."""
    if method not in STATS_METHODS:
        raise ValueError(f"{where} must be one of {STATS_METHODS}, got {method!r}")
    return method


def group_stats(xs: torch.Tensor, method: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """xs: (B, L, G, C/G) float32 (or float64) -> (σ², μ) over dims 1 and 3, each (B, 1, G, 1) (:data:`NHWC_STATS`)."""
    method = check_stats_method(method, "group_stats method") if method is not None else \
        check_stats_method(NHWC_STATS, "ldm.norm.NHWC_STATS")  # read at trace time: it may change after construction
    if method == "welford":
        return torch.var_mean(xs, dim=(1, 3), keepdim=True, correction=0)
    k = xs[:, :1, :, :1]  # (B, 1, G, 1): the shift, the group's first value
    d = xs - k
    if method == "partial":
        m1, m2 = _partial_moments(d)
    else:
        m1 = d.mean(dim=(1, 3), keepdim=True)  # E[x - K]
        m2 = d.square().mean(dim=(1, 3), keepdim=True)  # E[(x - K)²]
    return (m2 - m1.square()).clamp_min(0), k + m1


def _partial_moments(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d: (B, L, G, C/G) -> (E[d], E[d²]) over dims 1 and 3, each (B, 1, G, 1), from gcd(L, STATS_PARTS) partial
    sums, each over a run of rows and the group's channels, then added up term by term."""
    b, n_rows, g, cg = d.shape
    n = common_divisor(n_rows, STATS_PARTS)
    d = d.reshape(b, n, n_rows // n, g, cg)  # (B, n, L/n, G, C/G)
    s1, s2 = d.sum(dim=(2, 4)), d.square().sum(dim=(2, 4))  # (B, n, G) each: one reduction program per entry
    count = n_rows * cg
    m1 = functools.reduce(torch.add, s1.unbind(1)) / count  # (B, G): n - 1 additions, not a reduction kernel
    m2 = functools.reduce(torch.add, s2.unbind(1)) / count
    return m1.view(b, 1, g, 1), m2.view(b, 1, g, 1)


def common_divisor(n_rows: int, parts: int) -> int:
    """gcd(n_rows, parts), also for a symbolic ``n_rows`` (a dimension Dynamo made dynamic after a recompile, which
    ``math.gcd`` refuses): the largest divisor of ``parts`` that divides ``n_rows``, each test a shape guard."""
    return next(p for p in range(parts, 0, -1) if parts % p == 0 and n_rows % p == 0)


def channels_last_strides(shape: torch.Size) -> tuple[int, int, int, int]:
    """The strides of a contiguous (B, C, H, W) tensor laid out NHWC."""
    _, c, h, w = shape
    return (h * w * c, 1, w * c, c)


def compiling_with_grad(x: torch.Tensor | None = None) -> bool:
    """Whether Dynamo is tracing a graph that autograd differentiates: gradients enabled and, when x is given, x
    requires one. The layout-keeping backward paths of this package (here, :mod:`ldm.resample`, the U-Net's GEGLU
    and ``Conv2d``) apply only then; eager calls and inference keep torch's own ops."""
    if not (torch.compiler.is_compiling() and torch.is_grad_enabled()):
        return False
    return x is None or x.requires_grad


def force_channels_last(x: torch.Tensor) -> torch.Tensor:
    """x: (B, C, H, W) -> the same values with channels_last strides. Compiled, inductor lowers the prim to a layout
    requirement on x's buffer (``ExternKernel.require_stride_order``), so a buffer not yet written is written NHWC
    rather than copied. Eager, ``contiguous`` does the same (a copy only if x lacks those strides); compiled, it would
    be dropped, as the traced strides of an unwritten concatenation are channels_last already."""
    if not torch.compiler.is_compiling() or compiling_with_grad(x):  # the prim has no autograd formula
        return x.contiguous(memory_format=torch.channels_last)
    from torch._inductor import inductor_prims  # noqa: F401  registers prims.inductor_force_stride_order

    return torch.ops.prims.inductor_force_stride_order(x, channels_last_strides(x.shape))


def group_norm_nhwc(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    eps: float, stats: str | None = None) -> torch.Tensor:
    """GroupNorm of a 4-D channels_last x computed in its own memory order, in float32 (float64 for a float64 x),
    returned in x's dtype and layout: y = (x - μ_bg) / sqrt(σ²_bg + eps) · γ_c + β_c, with μ, σ² over the H·W·C/G
    values of sample b's group g (``stats``: how, one of :data:`STATS_METHODS`; None: :data:`NHWC_STATS`)."""
    b, c, h, w = x.shape
    g = num_groups
    x = force_channels_last(x)  # before the reshape below can fix a not-yet-written x as NCHW
    acc = torch.promote_types(x.dtype, torch.float32)  # fp16/bf16 -> fp32; never below the input's precision
    xs = x.permute(0, 2, 3, 1).reshape(b, h * w, g, c // g).to(acc)  # (B, HW, G, C/G), a view of the NHWC memory
    var, mean = group_stats(xs, stats)  # (B, 1, G, 1) each
    y = ((xs - mean) * torch.rsqrt(var + eps)).reshape(b, h, w, c)  # (B, H, W, C)
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype).permute(0, 3, 1, 2)  # (B, C, H, W), channels_last strides


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` whose compiled output keeps a channels_last input's layout (see the module docstring).

    ``stats``: how its compiled inference computes the statistics (:data:`STATS_METHODS`); None, the default, reads
    :data:`NHWC_STATS` when the graph is traced. Not saved: the state dict is ``nn.GroupNorm``'s."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None, *,
                 stats: str | None = None) -> None:
        super().__init__(num_groups, num_channels, eps, affine, device, dtype)
        self.stats = None if stats is None else check_stats_method(stats, "GroupNorm stats")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, *spatial) -> (B, C, *spatial), in x's memory format when compiling."""
        if not (torch.compiler.is_compiling() and is_channels_last(x)):
            return super().forward(x)
        if NHWC_TRAINING if torch.is_grad_enabled() else NHWC_INFERENCE:
            return group_norm_nhwc(x, self.num_groups, self.weight, self.bias, self.eps, self.stats)
        return super().forward(x).contiguous(memory_format=torch.channels_last)
