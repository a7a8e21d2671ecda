"""A two-way map between module prefixes of two state-dict layouts, with renames inside a module.

A rule says: keys under module ``src`` (layout A) live under module ``dst`` (layout B); inside it, sub-module names
are renamed with ``renames`` (``in_layers.0`` → ``norm1``), and the ``weight`` of the sub-modules named in
``conv_to_linear`` is a 1×1 convolution (C_out, C_in, 1, 1) in A and a Linear (C_out, C_in) in B. Keys are matched
on their longest rule prefix, so a rule for ``input_blocks.3.0.op`` wins over one for ``input_blocks.3.0``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch


@dataclass(frozen=True)
class _Rule:
    dst: str
    renames: Mapping[str, str] = field(default_factory=dict)
    conv_to_linear: frozenset[str] = frozenset()


def _rename_inner(module: str, renames: Mapping[str, str]) -> tuple[str, str]:
    """(renamed module path, the matched source sub-module name or the original path)."""
    best = ""
    for old in renames:
        if (module == old or module.startswith(old + ".")) and len(old) > len(best):
            best = old
    if not best:
        return module, module
    return renames[best] + module[len(best):], best


class KeyMap:
    """Rules from layout A to layout B; :meth:`forward` maps A → B and :meth:`backward` maps B → A."""

    def __init__(self) -> None:
        self._fwd: dict[str, _Rule] = {}
        self._bwd: dict[str, _Rule] = {}

    def add(self, src: str, dst: str, renames: Mapping[str, str] | None = None,
            conv_to_linear: tuple[str, ...] = ()) -> None:
        renames = dict(renames or {})
        if src in self._fwd or dst in self._bwd:
            raise ValueError(f"KeyMap: duplicate rule {src!r} -> {dst!r}")
        self._fwd[src] = _Rule(dst, renames, frozenset(conv_to_linear))
        inverse = {v: k for k, v in renames.items()}
        self._bwd[dst] = _Rule(src, inverse, frozenset(renames.get(n, n) for n in conv_to_linear))

    def forward(self, sd: Mapping[str, torch.Tensor], what: str = "state dict") -> dict[str, torch.Tensor]:
        """Layout A → B (a 1×1 conv weight becomes a Linear weight)."""
        return self._apply(self._fwd, sd, what, to_linear=True)

    def backward(self, sd: Mapping[str, torch.Tensor], what: str = "state dict") -> dict[str, torch.Tensor]:
        """Layout B → A (a Linear weight becomes a 1×1 conv weight)."""
        return self._apply(self._bwd, sd, what, to_linear=False)

    def targets(self) -> list[str]:
        """The B-side module prefixes (for tests and error messages)."""
        return list(self._bwd)

    @staticmethod
    def _match(rules: Mapping[str, _Rule], key: str) -> tuple[str, _Rule] | None:
        parts = key.split(".")
        for n in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:n])
            if prefix in rules:
                return prefix, rules[prefix]
        return None

    def _apply(self, rules: Mapping[str, _Rule], sd: Mapping[str, torch.Tensor], what: str,
               to_linear: bool) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        unmatched = []
        for key, value in sd.items():
            hit = self._match(rules, key)
            if hit is None:
                unmatched.append(key)
                continue
            prefix, rule = hit
            inner = key[len(prefix) + 1:]
            module, _, leaf = inner.rpartition(".")
            new_module, matched = _rename_inner(module, rule.renames) if module else ("", "")
            new_key = ".".join(p for p in (rule.dst, new_module, leaf) if p)
            if matched in rule.conv_to_linear and leaf == "weight":
                value = _reshape(value, to_linear, key)
            if new_key in out:
                raise KeyError(f"{what}: two keys map to {new_key!r} (the second is {key!r})")
            out[new_key] = value
        if unmatched:
            raise KeyError(f"{what}: {len(unmatched)} key(s) fit no module of the architecture, e.g. "
                           f"{unmatched[:5]} (wrong config for these weights?)")
        return out


def _reshape(w: torch.Tensor, to_linear: bool, key: str) -> torch.Tensor:
    if to_linear:
        if w.ndim == 4 and w.shape[2:] == (1, 1):
            return w[:, :, 0, 0]  # (C_out, C_in, 1, 1) -> (C_out, C_in)
        if w.ndim == 2:
            return w
    else:
        if w.ndim == 2:
            return w[:, :, None, None]  # (C_out, C_in) -> (C_out, C_in, 1, 1)
        if w.ndim == 4:
            return w
    raise ValueError(f"{key}: expected a 1x1 conv or Linear weight, got shape {tuple(w.shape)}")
