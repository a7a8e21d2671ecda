"""The optimizer step every stage uses: non-finite losses or gradients skip the step on every rank together.

A step is skipped when the loss or any gradient is NaN/inf on *any* rank (the flag is all-reduced, so ranks never
disagree and DDP never hangs). Skips are counted (``nonfinite_skipped``, saved in checkpoints); after
``max_consecutive`` skips in a row the run stops with a message.

Two ways to skip:

- **On the device** (fused Adam/AdamW, no fp16 grad scaler: every stage on CUDA). The flag goes to the optimizer as
  ``found_inf``, the same hook the AMP grad scaler uses: the fused kernel then leaves the weights, both moments and
  its step count untouched. Gradient clipping takes the scaler's other hook, ``grad_scale``: the kernel divides
  each gradient by max(‖g‖ / clip, 1) as it loads it, so the clip needs no pass of its own over the gradients.
  Nothing is read back to the host, so the host keeps queueing work while the GPU computes. A skipped step is a
  zero update: the step counter, the learning-rate schedule and the EMA advance as after any step (the EMA towards
  unchanged weights). The counts stay on the device. Every ``trainer.log_every_n_steps`` steps they start on their
  way to the host (a non-blocking copy and an event, ``ldm.training.step_log.copy_to_host``) and take effect a step
  or two later, once the GPU has got there: the warning, the ``train/skipped`` count and the stop after
  ``max_consecutive`` skips in a row (so the stop may come up to one log interval late). When a checkpoint is saved
  and when training ends they are read at once.
- **On the host** otherwise (CPU, SGD, fp16 with its grad scaler): the flag is read every step and a bad step is
  not taken: the weights and the optimizer's state (moments, step count) stay as they were. Otherwise it is the
  same zero update as on the device: it counts in ``trainer.global_step`` (:func:`count_skipped_step`), and the
  learning-rate schedule and the EMA advance, so the step axis of ``val/*``, the checkpoints, ``trainer.max_steps``
  and the schedule's position stay the window index of the ``train/*`` rows on both paths.

Under fp16 AMP (``trainer.precision: 16-mixed``) the gradients are not checked here: Lightning's AMP grad scaler
unscales them inside ``optimizer.step()``, skips the update when any is inf/NaN and halves its loss scale S (only
the loss is checked here, as above). That skip is detected by S dropping across ``optimizer.step()`` (a copy of the
scaler's ``_scale`` tensor taken before, compared after: one more host read per step, on a path that reads every
step anyway; a scaler that never drops S, with ``backoff_factor`` 1, goes unseen). A scaler-skipped step is then
treated as not taken: ``guarded_step`` returns False, so the caller advances neither its learning-rate schedule nor
its EMA (Lightning still counts the call in ``trainer.global_step``, as Hugging Face's Trainer counts its skipped
steps). It is counted apart, in ``amp_skipped`` (saved in checkpoints, logged as ``train/amp_skipped``), and logged
at info level for the first ``AMP_LOG_FIRST`` skips of a run (debug level after): overflow skips at the start of
fp16 training, and one now and then after S has grown, are the scaler calibrating S, not a fault. So they neither
count towards ``max_consecutive`` nor end a run of non-finite losses. The run stops with :class:`NonFiniteError`
once a skip leaves S below ``AMP_MIN_SCALE`` (1e-4): from its initial 2^16, halving at every skip, that is 30 skips
in a row (S = 2^-14), or more when good steps come between. At S < 1e-4 an fp16 backward overflows only for true
gradients above 65504 / S ≈ 6.5e8, so the gradients are NaN or inf, not merely large (a NaN gradient makes the
scaler skip at any S), and the run would otherwise go on training nothing. The scaler's S is in Lightning's
checkpoint, so that stop holds across a resume.

Gradient accumulation (``trainer.accumulate_grad_batches: k``, done here because every stage optimizes manually,
which Lightning's own accumulation refuses): each batch's backward adds ∇(loss/k); the gradients are all-reduced
across ranks only on the window's last batch (DDP ``no_sync`` before it); the step, its clipping and the finiteness
check act on the sum, and a non-finite loss anywhere in the window skips the whole step. Windows are counted in
batches (``module.batches_seen``), so they line up with the checkpoints, which are written after a step.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any

import torch
from lightning.pytorch.core.optimizer import LightningOptimizer

from ldm.training.sharding import sharded_norm
from ldm.training.step_log import HostReads, batches_per_step, closes_window

log = logging.getLogger(__name__)

AMP_MIN_SCALE = 1e-4  # a grad-scaler skip that leaves the loss scale below this stops the run (module docstring)
AMP_LOG_FIRST = 10  # grad-scaler skips logged at info level (calibration); debug level after


class NonFiniteError(RuntimeError):
    """Training produced non-finite losses or gradients too many times in a row."""


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """‖g‖₂ over all gradients (0-dim tensor), from multi-tensor norm kernels: a handful of launches for the ~700
    gradients of an SD U-Net, where one finiteness check per tensor took two launches each. NaN and ±inf in any
    gradient make the norm non-finite; so does a finite one whose square overflows float32 (|g| ≳ 1e19), which
    is skipped too."""
    if not grads:
        return torch.zeros(())
    sharded = sharded_norm(grads)  # trainer.strategy=fsdp: the shards of every rank
    if sharded is not None:
        return sharded
    return torch.nn.utils.get_total_norm(grads, 2.0, error_if_nonfinite=False, foreach=None)


class StepGuard:
    """State of the guard: counts of skipped steps, kept in the LightningModule and its checkpoints."""

    def __init__(self, max_consecutive: int = 10) -> None:
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0
        self.amp_skipped = 0  # steps the fp16 grad scaler skipped (inf/NaN gradients), apart from ``skipped``
        self.amp_consecutive = 0  # of them, the current run in a row
        # on-device counts since the last flush: (skipped, current run of skips, longest run), int64 (3,)
        self._pending: torch.Tensor | None = None
        self._counted = 0  # of the device's skipped count, how many ``skipped`` holds already
        self._reads = HostReads()  # counts on their way to the host

    def state_dict(self) -> dict[str, int]:
        self.flush(None)
        return {"skipped": self.skipped, "consecutive": self.consecutive, "amp_skipped": self.amp_skipped,
                "amp_consecutive": self.amp_consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Also a dict saved before the grad-scaler counts existed (no ``amp_*`` keys: they start at 0)."""
        self.skipped, self.consecutive = int(state["skipped"]), int(state["consecutive"])
        self.amp_skipped, self.amp_consecutive = int(state.get("amp_skipped", 0)), int(state.get("amp_consecutive", 0))
        self._pending, self._counted = None, 0
        self._reads = HostReads()

    def record_on_device(self, ok: torch.Tensor) -> None:
        """Count a step whose flag ``ok`` (0-dim bool) stays on the device; no host read."""
        if self._pending is None:  # kernels, not a host-to-device copy (which would wait for the queue)
            self._pending = torch.zeros(3, dtype=torch.long, device=ok.device)
            self._pending[1:] = self.consecutive
        bad = (~ok).long()
        skipped, run, worst = self._pending.unbind()
        run = (run + 1) * bad
        self._pending = torch.stack([skipped + bad, run, torch.maximum(worst, run)])

    def read_later(self, step: int | None) -> None:
        """Start the on-device counts on their way to the host, without waiting; :meth:`poll` applies them."""
        if self._pending is not None:
            self._reads.put(step, dict(zip(("skipped", "run", "worst"), self._pending.unbind())))

    def poll(self, wait: bool = False) -> None:
        """Apply the counts that have reached the host (``wait``: all of them, a host sync)."""
        for step, counts in self._reads.ready(wait):
            self._apply(step, int(counts["skipped"]), int(counts["run"]), int(counts["worst"]))

    def flush(self, step: int | None) -> None:
        """Read the on-device counts now (one host sync) and apply them; the host holds the whole state after."""
        self.read_later(step)
        self.poll(wait=True)
        self._pending, self._counted = None, 0

    def _apply(self, step: int | None, skipped: int, run: int, worst: int) -> None:
        """Device counts read at ``step``: warn about new skips, stop after too many in a row."""
        new, self._counted = skipped - self._counted, skipped
        self.consecutive = run
        where = f" up to step {step}" if step is not None else ""
        if new:
            self.skipped += new
            log.warning("%d non-finite step(s) skipped on every rank%s (%d skipped so far)", new, where,
                        self.skipped)
        if worst >= self.max_consecutive:
            raise NonFiniteError(f"{worst} consecutive steps had non-finite losses or gradients{where}; lower the "
                                 "learning rate, check the data, or use bf16 instead of fp16")

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

    def record_amp(self, skipped: bool, scale: float, step: int) -> None:
        """Count a step that reached the fp16 grad scaler: ``skipped`` when the scaler skipped it (inf/NaN
        gradients), which left its loss scale at ``scale``. Calibration skips are logged at info level; a skip that
        leaves the scale below ``AMP_MIN_SCALE`` stops the run (the module docstring says why)."""
        if not skipped:
            self.amp_consecutive = 0
            return
        self.amp_skipped += 1
        self.amp_consecutive += 1
        if scale < AMP_MIN_SCALE:
            raise NonFiniteError(
                f"the fp16 grad scaler skipped {self.amp_consecutive} consecutive steps for inf/NaN gradients (last at "
                f"step {step}) and its loss scale fell to {scale:.3g} < {AMP_MIN_SCALE:g}: the gradients are NaN or "
                "inf, not merely large, and no step is being taken; check the model and data for NaNs, lower the "
                "learning rate, or use bf16-mixed instead of 16-mixed")
        level = logging.INFO if self.amp_skipped <= AMP_LOG_FIRST else logging.DEBUG
        log.log(level, "step %d: the fp16 grad scaler found inf/NaN gradients and skipped the step (no schedule or "
                "EMA step), loss scale now %g (%d skipped so far; normal while the scale calibrates)", step, scale,
                self.amp_skipped)


def torch_optimizer(optimizer: Any) -> Any:
    """The ``torch.optim`` optimizer inside Lightning's wrapper (or :class:`UncountedStep`-like handles)."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def skips_on_device(optimizer: Any, scaler: Any) -> bool:
    """Whether a bad step can be skipped without a host read: fused Adam/AdamW honour ``found_inf``."""
    inner = torch_optimizer(optimizer)
    return scaler is None and isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) and bool(
        inner.defaults.get("fused"))


def min_over_ranks(module: Any, flags: torch.Tensor) -> torch.Tensor:
    """The elementwise minimum over all ranks. A plain all-reduce: Lightning's ``strategy.reduce`` puts a barrier
    before it, and a barrier makes the host wait for the GPU; the NCCL all-reduce alone only orders the stream."""
    trainer = module.trainer
    if trainer is None or trainer.world_size <= 1:
        return flags
    flags = flags.to(module.device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
        return flags
    return trainer.strategy.reduce(flags, reduce_op="min")


def accumulation(module: Any) -> tuple[int, bool]:
    """``(k, last)``: ``trainer.accumulate_grad_batches`` of the module's config (1 for a module without one) and
    whether the current batch (``module.batches_seen``, counted from 1) closes its window of k."""
    k = batches_per_step(module)
    return k, closes_window(module, k)


def _grad_sync(module: Any, sync: bool) -> Any:
    """DDP's ``no_sync`` for the batches of a window before its last (their gradients are only added up)."""
    strategy = module.trainer.strategy
    return nullcontext() if sync or not hasattr(strategy, "block_backward_sync") else strategy.block_backward_sync()


def _window_loss_ok(module: Any, optimizer: Any, loss: torch.Tensor, last: bool) -> torch.Tensor:
    """Whether every loss of the accumulation window so far is finite (a device tensor), per optimizer."""
    ok = torch.isfinite(loss.detach()).all()
    pending: dict[int, torch.Tensor] = vars(module).setdefault("_window_loss_ok", {})
    key = id(torch_optimizer(optimizer))
    if key in pending:
        ok = ok & pending.pop(key)
    if not last:
        pending[key] = ok
    return ok


def guarded_step(module: Any, optimizer: Any, loss: torch.Tensor, params: list[torch.Tensor],
                 clip: float | None = None, check_grads: bool = True) -> bool:
    """Backward + step for a manual-optimization LightningModule. Returns whether the caller should advance its
    schedule and EMA: True for every step, a non-finite one skipped on either path included (a zero update); False
    for one the fp16 grad scaler skipped and for a batch that only accumulates gradients (see the module docstring).
    A skipped step counts in ``trainer.global_step`` on every path; a batch that only accumulates does not.

    ``module.guard`` is the :class:`StepGuard`. Gradients are zeroed after every step, taken or skipped.
    """
    k, last = accumulation(module)
    with _grad_sync(module, last):
        module.manual_backward(loss / k if k > 1 else loss)
    loss_ok = _window_loss_ok(module, optimizer, loss, last)
    if not last:
        return False
    scaler = getattr(module.trainer.precision_plugin, "scaler", None)
    if scaler is not None:
        check_grads = False  # fp16: the AMP grad scaler skips overflowing steps itself and lowers its scale
    grads = [p.grad for p in params if p.grad is not None]
    norm = grad_norm(grads) if check_grads or (clip and scaler is None) else None  # also what clipping needs
    grads_ok = torch.isfinite(norm) if check_grads else torch.ones((), dtype=torch.bool, device=loss.device)
    flags = torch.stack([loss_ok, grads_ok.to(loss.device)]).float()  # (2,) on device
    flags = min_over_ranks(module, flags)  # ranks decide together
    if skips_on_device(optimizer, scaler):
        return _step_on_device(module, optimizer, flags.min() > 0.5, grads, clip, norm)
    return _step_on_host(module, optimizer, flags, grads, clip, norm, scaler)


def _clip(grads: list[torch.Tensor], clip: float | None, norm: torch.Tensor | None, scaler: Any) -> None:
    """Clip the gradients themselves (the host path): divide them by max((‖g‖ + 1e-6) / clip, 1), the clip of
    ``clip_grad_norm_``. Not ``clip_grads_with_norm_``: it takes parameters and reads their ``.grad``, so given the
    gradients it found none and clipped nothing (2026-11-29 to 12-06). Under fp16 AMP the gradients are still
    multiplied by the scaler's S here (Lightning unscales them inside the optimizer step, after this), so the norm
    that is clipped is ‖g‖ / S (Lightning's own ``clip_gradients`` clipped the scaled norm: to clip / S)."""
    if not (clip and grads):
        return
    if scaler is not None:
        norm = grad_norm(grads) / _loss_scale(scaler)
    if norm is None:
        return
    divisor = clip_divisor(norm, float(clip))
    for device in {g.device for g in grads}:
        torch._foreach_div_([g for g in grads if g.device == device], divisor.to(device))


def _loss_scale(scaler: Any) -> torch.Tensor:
    """The AMP grad scaler's current S as a tensor where it holds one (no host read), else its ``get_scale()``."""
    scale = getattr(scaler, "_scale", None)
    return scale.float() if isinstance(scale, torch.Tensor) else torch.tensor(float(scaler.get_scale()))


def clip_divisor(norm: torch.Tensor, clip: float) -> torch.Tensor:
    """max((‖g‖ + 1e-6) / clip, 1), fp32: dividing every gradient by it is ``clip_grads_with_norm_``'s clip (each
    gradient times clip / (‖g‖ + 1e-6), at most 1). Fused Adam(W) divides by its ``grad_scale`` as it loads each
    gradient, so the clip costs no pass over the gradients of its own."""
    return torch.clamp((norm.float() + 1e-6) / clip, min=1.0)


def _step_on_device(module: Any, optimizer: Any, ok: torch.Tensor, grads: list[torch.Tensor],
                    clip: float | None, norm: torch.Tensor | None) -> bool:
    """The fused kernel skips the update where ``found_inf`` is 1 and clips by dividing by ``grad_scale`` (it writes
    the clipped gradients back); the counts start for the host at log steps."""
    guard: StepGuard = module.guard
    step = module.global_step  # before the step, which advances it
    inner = torch_optimizer(optimizer)
    inner.found_inf = (~ok).float()
    if clip and grads and norm is not None:  # a non-finite norm: found_inf is 1, the step is skipped
        inner.grad_scale = clip_divisor(norm, float(clip))
    try:
        optimizer.step()
    finally:
        del inner.found_inf
        vars(inner).pop("grad_scale", None)
    optimizer.zero_grad(set_to_none=True)
    guard.record_on_device(ok)
    every = int(getattr(module.trainer, "log_every_n_steps", 1) or 1)
    if (step + 1) % every == 0:
        guard.read_later(step)
    guard.poll()
    return True


def _step_on_host(module: Any, optimizer: Any, flags: torch.Tensor, grads: list[torch.Tensor],
                  clip: float | None, norm: torch.Tensor | None, scaler: Any) -> bool:
    """One host read of the (loss, gradients) flags, which travel together; a bad step is not taken (still True:
    the schedule and the EMA advance, as after the device path's zero update). Under fp16 AMP a second read after
    the step: whether the grad scaler skipped it (then False, counted in ``amp_skipped``)."""
    guard: StepGuard = module.guard
    loss_ok, grads_ok = (bool(f > 0.5) for f in flags.cpu())
    if not (loss_ok and grads_ok):
        guard.record(False, "loss" if not loss_ok else "gradients", module.global_step)  # the skipped step's index
        optimizer.zero_grad(set_to_none=True)
        count_skipped_step(optimizer)
        return True  # a zero update: the schedule and the EMA advance, as on the device
    _clip(grads, clip, norm, scaler)
    step = module.global_step  # before the step, which advances it
    before = _scale_copy(scaler)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if before is not None:  # fp16: did the grad scaler skip the step (the module docstring)?
        skipped, scale = _scaler_skipped(scaler, before)
        guard.record_amp(skipped, scale, step)
        if skipped:
            return False  # not taken: no schedule or EMA step; neither ends nor extends a run of non-finite losses
    guard.record(True, "", step)
    return True


def count_skipped_step(optimizer: Any) -> None:
    """Count a step skipped on the host in ``trainer.global_step`` without taking it.

    Why: under manual optimization Lightning's ``global_step`` is the manual loop's ``optim_step_progress`` (its
    completed count), advanced only inside ``LightningOptimizer.step``, by the ``_on_before_step`` and
    ``_on_after_step`` hooks the loop sets for the training step (``increment_ready``, ``increment_completed``).
    The device path and an fp16 grad-scaler skip call ``step()`` and so count a skipped step; a host skip that did
    not would let ``val/*``, checkpoint names and ``trainer.max_steps`` fall one step behind the ``train/*`` rows'
    window index per skip. Calling the step itself with the gradients cleared is no way out: under fp16 the grad
    scaler's ``step`` then asserts (``No inf checks were recorded for this optimizer``), and it would run the
    ``on_before_optimizer_step`` hooks for a step not taken. So the two hooks alone, which touch only the loop's
    counter and its profiler. Nothing for another handle (a plain torch optimizer, or the autoencoder's
    ``UncountedStep``, whose steps are not counted anyway); outside the training step the hooks do nothing."""
    if isinstance(optimizer, LightningOptimizer):
        optimizer._on_before_step()
        optimizer._on_after_step()


def _scale_copy(scaler: Any) -> torch.Tensor | None:
    """The enabled AMP grad scaler's loss scale before a step, to compare after it (:func:`_scaler_skipped`): a copy
    of :func:`_loss_scale` (``update`` changes the scaler's tensor in place; no host read). None without an enabled
    scaler."""
    if scaler is None or not scaler.is_enabled():
        return None
    return _loss_scale(scaler).reshape(()).clone()


def _scaler_skipped(scaler: Any, before: torch.Tensor) -> tuple[bool, float]:
    """(whether the scaler skipped the step just run, its loss scale now): it skipped iff its ``update`` lowered
    the scale (it lowers it only on inf/NaN gradients; it only grows it otherwise). One host read."""
    now = _loss_scale(scaler).reshape(()).to(before.device)
    was, now_value = torch.stack([before, now]).tolist()
    return now_value < was, now_value
