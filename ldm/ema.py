"""Exponential moving average of weights, stored the way the original LDM ``LitEma`` stores it.

Buffers are named after the parameters with dots removed (``diffusion_model.out.2.weight`` ->
``diffusion_modelout2weight``) next to ``decay`` and ``num_updates``, so a module attribute named ``model_ema``
produces exactly the ``model_ema.*`` keys of released SD checkpoints.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ldm.shards import local_shard


class EMA(nn.Module):
    """θ_ema ← θ_ema + (1 − β)(θ − θ_ema) with β = min(decay, (1 + n)/(10 + n)) during warm-up (LitEma's rule).

    ``decay`` and ``num_updates`` are buffers (saved as in LitEma) with a copy on the host, so an update reads no
    device value: no host–device sync per training step. The host copy is refreshed when a state dict is loaded.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if warmup else -1, dtype=torch.int))
        self.names: dict[str, str] = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                self.names[name] = name.replace(".", "")
                self.register_buffer(self.names[name], p.detach().float().clone())
        self._host: tuple[int, float] | None = None  # (num_updates, decay), read from the buffers once

    def _host_state(self) -> tuple[int, float]:
        if self._host is None:
            self._host = (int(self.num_updates), float(self.decay))
        return self._host

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(*args, **kwargs)
        self._host = None

    def current_decay(self) -> float:
        return self._decay(*self._host_state())

    @staticmethod
    def _decay(n: int, d: float) -> float:
        """β after n updates (LitEma's warm-up; n < 0: no warm-up)."""
        return d if n < 0 else min(d, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module, steps: int = 1) -> None:
        """EMA steps towards ``model``'s current parameters: ``steps`` > 1 folds that many training steps into one
        pass, θ_ema ← θ_ema + (1 − Π β_i)(θ − θ_ema) over the steps' decays β_i, which is exactly ``steps`` single
        updates towards the same θ (``train.ema_every_n_steps``: one pass over the weights every N steps, with the
        per-step time constant). ``num_updates`` counts steps either way."""
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"EMA.update: steps must be an int ≥ 1, got {steps!r}")
        n, d = self._host_state()
        beta = 1.0
        for _ in range(steps):
            if n >= 0:  # counts updates only with warm-up
                n += 1
            beta *= self._decay(n, d)
        self._host = (n, d)
        if n >= 0:
            self.num_updates.fill_(n)  # a kernel, not a read back
        params = dict(model.named_parameters())
        shadow = [local_shard(getattr(self, s)) for s in self.names.values()]
        current = [local_shard(params[n]).to(shadow[0].dtype) for n in self.names]
        torch._foreach_lerp_(shadow, current, 1.0 - beta)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for n, s in self.names.items():
            params[n].copy_(getattr(self, s))

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily put the EMA weights into ``model`` (sampling callbacks), restoring the raw ones after."""
        params = dict(model.named_parameters())
        saved = {n: params[n].detach().clone() for n in self.names}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, t in saved.items():
                    params[n].copy_(t)

    def ldm_state(self, prefix: str = "model_ema.") -> dict[str, torch.Tensor]:
        """``{"model_ema.<name without dots>": tensor, ...}`` as in released SD checkpoints."""
        return {prefix + k: v for k, v in self.state_dict().items()}

