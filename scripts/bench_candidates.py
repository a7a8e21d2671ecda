"""Changes under test that bench.py can time before any of them goes into ``ldm``: inductor settings
(``--inductor KEY=VALUE``) and patches of our model (``--candidate NAME``), both named in the rows' variant.

A candidate patches our model for the benchmark process only. It leaves this file either for the library,
measured, or for the bin, with its numbers in docs/BENCHMARKS.md.
"""
from __future__ import annotations

from typing import Callable

import torch

INDUCTOR_SET: dict[str, object] = {}  # --inductor settings of this run
CANDIDATES_ON: list[str] = []  # --candidate patches of this run


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


def apply_candidate(name: str) -> Callable[[], None]:
    """Patch our model with the candidate ``name`` for the rest of the process; returns the undo."""
    undo = CANDIDATES[name][1]()
    CANDIDATES_ON.append(name)
    return undo


def group_norm_strided(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                       eps: float) -> torch.Tensor:
    """GroupNorm from ``var_mean`` and elementwise ops (fp32 out, as autocast runs ``group_norm``).

    x: (B, C, H, W) -> (B, C, H, W). Grouping C into G × C/G is a view in either layout, and these ops keep their
    input's strides forward and backward. The question it is here for: the compiled 512 px training step still
    hands the first convolution of each ResBlock an NCHW gradient, written by the fused reduction kernel of
    GroupNorm's backward (docs/BENCHMARKS.md); without ``native_group_norm``/``_backward`` in the graph, does inductor
    write it in channels_last, and at what cost to the forward reduction?"""
    b, c, h, w = x.shape
    x5 = x.float().view(b, groups, c // groups, h, w)  # (B, G, C/G, H, W)
    var, mean = torch.var_mean(x5, dim=(2, 3, 4), keepdim=True, correction=0)  # (B, G, 1, 1, 1)
    y = ((x5 - mean) * torch.rsqrt(var + eps)).view(b, c, h, w)  # (B, C, H, W)
    if weight is not None:
        y = y * weight.float().view(1, c, 1, 1)
    if bias is not None:
        y = y + bias.float().view(1, c, 1, 1)
    return y


def _gn_strided() -> Callable[[], None]:
    """ldm.norm.GroupNorm uses :func:`group_norm_strided` for channels_last inputs while compiling."""
    from ldm.norm import GroupNorm, is_channels_last

    eager = GroupNorm.forward

    def forward(self: GroupNorm, x: torch.Tensor) -> torch.Tensor:
        if not (torch.compiler.is_compiling() and is_channels_last(x)):
            return eager(self, x)
        y = group_norm_strided(x, self.num_groups, self.weight, self.bias, self.eps)
        return y if torch.is_autocast_enabled(x.device.type) else y.to(x.dtype)

    GroupNorm.forward = forward

    def restore() -> None:
        GroupNorm.forward = eager

    return restore


# name -> (row-variant suffix, patch returning its undo)
CANDIDATES: dict[str, tuple[str, Callable[[], Callable[[], None]]]] = {
    "gn-strided": ("_gnstrided", _gn_strided),
}
