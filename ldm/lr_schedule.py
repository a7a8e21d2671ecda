"""Learning-rate multipliers (used with ``torch.optim.lr_scheduler.LambdaLR``).

:class:`LambdaLinearScheduler` reproduces the original LDM ``ldm.lr_scheduler.LambdaLinearScheduler`` (SD's 10k-step
linear warm-up, then linear from ``f_max`` to ``f_min`` over each cycle) as a stateless callable.
"""
from __future__ import annotations

import bisect
import warnings
from itertools import accumulate
from typing import Any, Sequence

# torch's scheduler, at its first step, when the optimizer has not stepped yet
_BEFORE_OPTIMIZER = r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`"


class LambdaLinearScheduler:
    """f(n): warm up linearly from ``f_start`` to ``f_max`` in ``warm_up_steps``, then move linearly to ``f_min``
    at the end of the cycle. All arguments are per-cycle lists, as in the original YAMLs."""

    def __init__(self, warm_up_steps: Sequence[int], f_min: Sequence[float], f_max: Sequence[float],
                 f_start: Sequence[float], cycle_lengths: Sequence[float], verbosity_interval: int = 0) -> None:
        lists = dict(warm_up_steps=warm_up_steps, f_min=f_min, f_max=f_max, f_start=f_start,
                     cycle_lengths=cycle_lengths)
        n = {len(v) for v in lists.values()}
        if len(n) != 1:
            raise ValueError(f"LambdaLinearScheduler: per-cycle lists differ in length: "
                             f"{ {k: len(v) for k, v in lists.items()} }")
        self.warm_up_steps = [int(w) for w in warm_up_steps]
        self.f_min, self.f_max, self.f_start = list(f_min), list(f_max), list(f_start)
        self.cycle_lengths = [float(c) for c in cycle_lengths]
        self.cum_cycles = [0.0, *accumulate(self.cycle_lengths)]

    def cycle(self, n: int) -> int:
        return min(bisect.bisect_left(self.cum_cycles, n, lo=1) - 1, len(self.cycle_lengths) - 1)

    def __call__(self, n: int) -> float:
        c = self.cycle(n)
        n = n - self.cum_cycles[c]
        if n < self.warm_up_steps[c]:
            return (self.f_max[c] - self.f_start[c]) / self.warm_up_steps[c] * n + self.f_start[c]
        return self.f_min[c] + (self.f_max[c] - self.f_min[c]) * (self.cycle_lengths[c] - n) / self.cycle_lengths[c]


def linear_warmup(warmup_steps: int) -> "LambdaLinearScheduler":
    """Warm up from 0 to 1 over ``warmup_steps`` then stay constant (SD's recipe)."""
    return LambdaLinearScheduler([max(warmup_steps, 1)], [1.0], [1.0], [1e-6 if warmup_steps else 1.0], [1e13])


def advance(scheduler: Any) -> None:
    """One step of a learning-rate scheduler, after a training step the guard counted (``ldm.training.guard``).

    A non-finite step the guard turned into a zero update off the fused optimizer (no ``optimizer.step()`` call)
    advances the schedule all the same, by design: the schedule's position stays the step index. torch warns of
    that at the scheduler's first step ("the first value of the learning rate schedule" is skipped), which is what
    is meant, so that one warning is silenced here; any other passes. (A step fp16's grad scaler skips advances no
    schedule: the guard reports it as not taken.)"""
    if getattr(scheduler, "_step_count", 0) > 1:  # torch checks at the first step only
        scheduler.step()
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_BEFORE_OPTIMIZER, category=UserWarning)
        scheduler.step()
