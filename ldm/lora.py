"""LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

``W x + (α / r) · B A x`` with A (r × in) and B (out × r), B initialised to zero so the adapted model starts equal to
the base. :class:`LoRALinear` subclasses ``nn.Linear`` and keeps ``weight``/``bias`` under their original names, so
the base state dict layout (and SD checkpoint compatibility) is untouched; adapter weights live under ``lora_A`` /
``lora_B`` and are saved on their own (:func:`lora_state_dict`) and can be merged into the base weights
(:func:`merge_lora`).
"""
from __future__ import annotations

import logging
import math
from typing import Iterable

import torch
from torch import nn

log = logging.getLogger(__name__)

DEFAULT_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                   "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` with a low-rank update; ``merge()`` folds the update into ``weight``."""

    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int, alpha: float) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.rank, self.scale = rank, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @classmethod
    def wrap(cls, linear: nn.Linear, rank: int, alpha: float) -> "LoRALinear":
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, rank, alpha)
        new.to(device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(linear.weight)
            if linear.bias is not None:
                new.bias.copy_(linear.bias)
        new.weight.requires_grad_(linear.weight.requires_grad)  # the base stays frozen: only A and B train
        if new.bias is not None:
            new.bias.requires_grad_(linear.bias.requires_grad)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = super().forward(x)  # (..., out)
        return base + (x @ self.lora_A.t().to(x.dtype)) @ self.lora_B.t().to(x.dtype) * self.scale

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        out.to(device=self.weight.device, dtype=self.weight.dtype)
        out.weight.copy_(self.weight + (self.lora_B.float() @ self.lora_A.float()).to(self.weight.dtype) * self.scale)
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def add_lora(model: nn.Module, rank: int, alpha: float | None = None,
             targets: Iterable[str] = DEFAULT_TARGETS) -> list[str]:
    """Replace every ``nn.Linear`` whose name ends with one of ``targets`` by a :class:`LoRALinear`; freeze all
    other parameters. Returns the adapted module names (an error if none matched)."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    targets = tuple(targets)
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear) and n.endswith(targets)]
    if not names:
        raise ValueError(f"LoRA targets {targets} matched no nn.Linear module")
    model.requires_grad_(False)
    for n in names:
        _set(model, n, LoRALinear.wrap(model.get_submodule(n), rank, float(alpha or rank)))
    log.info("LoRA rank %d on %d modules", rank, len(names))
    return names


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights (``…to_q.lora_A`` …) plus their scale, for saving on their own."""
    sd = {k: v for k, v in model.state_dict().items() if k.endswith(("lora_A", "lora_B"))}
    for n, m in model.named_modules():
        if isinstance(m, LoRALinear):
            sd[f"{n}.lora_scale"] = torch.tensor(m.scale)
    return sd


def strip_lora(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict without adapter keys (the base model in its original layout)."""
    return {k: v for k, v in sd.items() if not k.endswith(("lora_A", "lora_B"))}


def load_lora(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Attach adapters saved by :func:`lora_state_dict` to a model without them, then load their weights."""
    names = sorted({k.rsplit(".", 1)[0] for k in sd if k.endswith("lora_A")})
    for n in names:
        rank = sd[f"{n}.lora_A"].shape[0]
        scale = float(sd.get(f"{n}.lora_scale", torch.tensor(1.0)))
        _set(model, n, LoRALinear.wrap(model.get_submodule(n), rank, scale * rank))
    missing = [k for k in sd if not k.endswith("lora_scale") and k not in dict(model.named_parameters())]
    if missing:
        raise KeyError(f"LoRA keys without a matching module: {missing[:5]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in sd.items():
            if not k.endswith("lora_scale"):
                params[k].copy_(v)


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight; returns how many were merged."""
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for n in names:
        _set(model, n, model.get_submodule(n).merge())
    return len(names)
