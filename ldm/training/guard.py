"""The optimizer step every stage uses: non-finite losses or gradients skip the step on every rank together.

A step is skipped when the loss or any gradient is NaN/inf on *any* rank (the flag is all-reduced, so ranks never
disagree and DDP never hangs). Skips are counted (``nonfinite_skipped``, saved in checkpoints); after
``max_consecutive`` skips in a row the run stops with a message.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Training produced non-finite losses or gradients too many times in a row."""


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """‖g‖₂ over all gradients (0-dim tensor), from multi-tensor norm kernels: a handful of launches for the ~700
    gradients of an SD U-Net, where one finiteness check per tensor took two launches each. NaN and ±inf in any
    gradient make the norm non-finite; so does a finite one whose square overflows float32 (|g| ≳ 1e19), which
    is skipped too."""
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, 2.0, error_if_nonfinite=False, foreach=None)


class StepGuard:
    """State of the guard: counts of skipped steps, kept in the LightningModule and its checkpoints."""

    def __init__(self, max_consecutive: int = 10) -> None:
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped, self.consecutive = int(state["skipped"]), int(state["consecutive"])

    def record(self, ok: bool, what: str, step: int) -> None:
        if ok:
            self.consecutive = 0
            return
        self.skipped += 1
        self.consecutive += 1
        log.warning("step %d: non-finite %s; step skipped on every rank (%d skipped so far)", step, what, self.skipped)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(f"{self.consecutive} consecutive steps had non-finite {what} (last at step {step}); "
                                 "lower the learning rate, check the data, or use bf16 instead of fp16")


def guarded_step(module: Any, optimizer: Any, loss: torch.Tensor, params: list[torch.Tensor],
                 clip: float | None = None, check_grads: bool = True) -> bool:
    """Backward + step for a manual-optimization LightningModule. Returns whether the step was taken.

    ``module.guard`` is the :class:`StepGuard`. Gradients are zeroed in every case.
    """
    guard: StepGuard = module.guard
    step = module.global_step
    module.manual_backward(loss)
    scaler = getattr(module.trainer.precision_plugin, "scaler", None)
    if scaler is not None:
        check_grads = False  # fp16: the AMP grad scaler skips overflowing steps itself and lowers its scale
    # one host sync per step: the loss flag and the gradient flag travel together (and across ranks together)
    grads = [p.grad for p in params if p.grad is not None]
    norm = grad_norm(grads) if check_grads or (clip and scaler is None) else None  # also what clipping needs
    grads_ok = torch.isfinite(norm) if check_grads else torch.tensor(True)
    flags = torch.stack([torch.isfinite(loss.detach()).all(), grads_ok.to(loss.device)]).float()  # (2,) on device
    if module.trainer is not None and module.trainer.world_size > 1:
        flags = module.trainer.strategy.reduce(flags.to(module.device), reduce_op="min")
    loss_ok, grads_ok = (bool(f > 0.5) for f in flags.cpu())
    if not (loss_ok and grads_ok):
        guard.record(False, "loss" if not loss_ok else "gradients", step)
        optimizer.zero_grad(set_to_none=True)
        return False
    if clip and scaler is None and grads:  # real gradients (fp32/bf16): works with fused AdamW
        torch.nn.utils.clip_grads_with_norm_(grads, float(clip), norm, foreach=None)
    elif clip and scaler is not None:
        module.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")  # unscales first
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    guard.record(True, "", step)
    return True
