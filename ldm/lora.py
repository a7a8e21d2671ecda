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
    def merged_weight(self) -> torch.Tensor:
        """W + (α/r)·B A (out, in), summed in float32 and rounded once to the weight's dtype (fp16 and bf16 too)."""
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale  # (out, in)
        return (self.weight.float() + delta.to(self.weight.device)).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain ``nn.Linear`` with :meth:`merged_weight`; the base's ``requires_grad`` is kept."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        out.to(device=self.weight.device, dtype=self.weight.dtype)
        out.weight.copy_(self.merged_weight())
        out.weight.requires_grad_(self.weight.requires_grad)
        if self.bias is not None:
            out.bias.copy_(self.bias)
            out.bias.requires_grad_(self.bias.requires_grad)
        return out


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    """peft's ``target_modules`` rule: the whole name, or a suffix after a dot ("to_q" fits "attn1.to_q", "q" not)."""
    return any(name == t or name.endswith("." + t) for t in targets)


def add_lora(model: nn.Module, rank: int, alpha: float | None = None,
             targets: Iterable[str] = DEFAULT_TARGETS) -> list[str]:
    """Replace every ``nn.Linear`` whose name is one of ``targets`` or ends with ".<target>" by a :class:`LoRALinear`
    (scale α/r, α = ``alpha`` or r when None); freeze all other parameters. Returns the adapted module names (an error
    if none matched)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"LoRA rank must be a positive int, got {rank!r}")
    if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"LoRA alpha must be a finite number > 0 (or None for alpha = rank), got {alpha!r}")
    targets = tuple(targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"LoRA targets must be a non-empty list of module names, got {list(targets)!r}")
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear) and _matches(n, targets)]
    if not names:
        raise ValueError(f"LoRA targets {list(targets)} matched no nn.Linear module (a target is a module name or its "
                         "last dotted parts, e.g. 'attn1.to_q' or 'to_q')")
    model.requires_grad_(False)
    scale_alpha = float(rank if alpha is None else alpha)
    for n in names:
        _set(model, n, LoRALinear.wrap(model.get_submodule(n), rank, scale_alpha))
    log.info("LoRA rank %d (alpha %g) on %d modules", rank, scale_alpha, len(names))
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


def _check_adapter(model: nn.Module, name: str, sd: dict[str, torch.Tensor]) -> None:
    """The module ``name`` is a plain ``nn.Linear`` of the model and ``sd`` has its A (r × in) and B (out × r)."""
    try:
        m = model.get_submodule(name)
    except AttributeError:
        raise KeyError(f"LoRA key {name}.lora_A: the model has no module {name!r}") from None
    if isinstance(m, LoRALinear):
        raise ValueError(f"LoRA module {name!r} already has an adapter: merge it first (merge_lora) or load this one "
                         "into a model without adapters")
    if not isinstance(m, nn.Linear):
        raise ValueError(f"LoRA key {name}.lora_A: {name!r} is a {type(m).__name__}, not an nn.Linear")
    a, b = sd[f"{name}.lora_A"], sd.get(f"{name}.lora_B")
    if b is None:
        raise KeyError(f"LoRA key {name}.lora_A has no {name}.lora_B beside it")
    r = a.shape[0] if a.dim() == 2 else -1
    if r < 1 or tuple(a.shape) != (r, m.in_features) or tuple(b.shape) != (m.out_features, r):
        raise ValueError(f"LoRA {name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit an "
                         f"nn.Linear({m.in_features}, {m.out_features}) (expected (r, {m.in_features}) and "
                         f"({m.out_features}, r))")
    scale = sd.get(f"{name}.lora_scale")
    if scale is not None and (scale.numel() != 1 or not math.isfinite(float(scale))):
        raise ValueError(f"LoRA key {name}.lora_scale: expected one finite number, got {scale.tolist()!r}")


def load_lora(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Attach adapters saved by :func:`lora_state_dict` to a model without them, then load their weights. Every
    ``lora_A`` needs its ``lora_B`` (and the other way round), shaped for its ``nn.Linear``; errors name the key."""
    names = sorted({k.rsplit(".", 1)[0] for k in sd if k.endswith(".lora_A")})
    known = {f"{n}.{part}" for n in names for part in ("lora_A", "lora_B", "lora_scale")}
    stray = [k for k in sd if k not in known]
    if stray:
        raise KeyError(f"LoRA keys that are not <module>.lora_A/lora_B/lora_scale of a module with a lora_A: "
                       f"{stray[:5]}")
    for n in names:  # all checked before the model changes
        _check_adapter(model, n, sd)
    for n in names:
        rank = sd[f"{n}.lora_A"].shape[0]
        scale = float(sd.get(f"{n}.lora_scale", torch.tensor(1.0)))
        _set(model, n, LoRALinear.wrap(model.get_submodule(n), rank, scale * rank))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in sd.items():
            if not k.endswith("lora_scale"):
                params[k].copy_(v)


def merged_state_dict(model: nn.Module, where: str = "save") -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with attached (unmerged) adapters folded into their base weights, as the model computes:
    the original key layout that other tools and :func:`ldm.load` read (they would drop or refuse ``lora_A`` /
    ``lora_B`` beside a Linear); ``model`` keeps its adapters."""
    sd = dict(model.state_dict())
    adapters = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name, module in adapters:
        sd[f"{name}.weight"] = module.merged_weight()
        del sd[f"{name}.lora_A"], sd[f"{name}.lora_B"]
    if adapters:
        log.info("%s: %d LoRA adapter(s) merged into the written weights (the model keeps them)", where, len(adapters))
    return sd


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight; returns how many were merged."""
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for n in names:
        _set(model, n, model.get_submodule(n).merge())
    return len(names)
