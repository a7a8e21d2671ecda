"""A guard for inductor's autotuned convolutions on torch builds that can pick wrong ones.

With max-autotune, inductor times Triton convolution templates against cuDNN and keeps the fastest. Non-1×1
templates compiled with 8 warps compute wrong results (pytorch/pytorch#173068, from triton-lang/triton#1254).
Torch caps them at 4 warps since pytorch/pytorch#183989 (May 2026). On an older build, such as the torch 2.11 of
our H200 machines, where max-autotune did pick 8-warp convolutions for the SD U-Net (docs/BENCHMARKS.md),
:func:`guard_conv_templates` drops the 8-warp configs before they are timed.
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Callable

log = logging.getLogger(__name__)

MAX_CONV_WARPS = 4
CAP_SOURCE = "min(cfg.num_warps, 4)"  # the cap's line in torch/_inductor/kernel/conv.py since #183989


def autotunes(mode: str | None, options: dict[str, Any] | None) -> bool:
    """Whether a compile with this mode and these inductor options (or the process-wide config) autotunes
    templates."""
    import torch._inductor.config as inductor_config
    from torch._inductor import list_mode_options

    settings = {**list_mode_options(mode or "default"), **(options or {})}
    keys = ("max_autotune", "max_autotune_gemm")
    return any(settings.get(k, getattr(inductor_config, k, False)) for k in keys)


def inductor_caps_conv_warps() -> bool:
    """Whether this torch's inductor keeps non-1×1 Triton convolution templates at 4 warps or fewer."""
    import torch._inductor.kernel.conv as conv

    try:
        return CAP_SOURCE in inspect.getsource(conv)
    except (OSError, TypeError):  # no source shipped: assume the old behaviour and guard
        return False


def narrow_conv_configs(select: Callable[[list, tuple], list], tag: str | None = None) -> Callable[[], None]:
    """Pass the convolution template configs inductor offers through ``select(configs, sizes)`` (process-wide;
    ``configs``: triton.Configs, ``sizes``: the problem's (M, N, K)). Returns the undo; ``tag`` names the wrapper."""
    from torch._inductor.choices import InductorChoices

    original = InductorChoices.get_conv_configs

    def get_conv_configs(self: Any, *args: Any, **kwargs: Any) -> Any:
        configs = original(self, *args, **kwargs)  # a function of the problem's sizes, yielding triton.Configs
        return lambda *a, **kw: iter(select(list(configs(*a, **kw)), a))

    get_conv_configs.ldm_narrowed = tag  # type: ignore[attr-defined]
    InductorChoices.get_conv_configs = get_conv_configs

    def undo() -> None:
        InductorChoices.get_conv_configs = original

    return undo


def cap_conv_template_warps(max_warps: int = MAX_CONV_WARPS) -> bool:
    """Make inductor offer only convolution template configs with at most ``max_warps`` warps (process-wide, once).
    Returns whether the cap was installed by this call."""
    from torch._inductor.choices import InductorChoices

    if getattr(InductorChoices.get_conv_configs, "ldm_narrowed", None) == "warp-cap":
        return False
    narrow_conv_configs(lambda configs, sizes: [c for c in configs if c.num_warps <= max_warps], "warp-cap")
    return True


def guard_conv_templates(mode: str | None, options: dict[str, Any] | None) -> None:
    """Before compiling with autotuning on a torch whose inductor does not cap convolution templates at 4 warps,
    install the cap (:func:`cap_conv_template_warps`) and say so."""
    if autotunes(mode, options) and not inductor_caps_conv_warps() and cap_conv_template_warps():
        import torch

        log.warning("torch %s's inductor can autotune 3x3 convolutions to 8-warp Triton templates, which compute "
                    "wrong results (pytorch/pytorch#173068); ldm keeps them at %d warps", torch.__version__,
                    MAX_CONV_WARPS)
