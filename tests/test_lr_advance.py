"""``ldm.lr_schedule.advance``: a schedule step after a step the guard skipped, without torch's first-step warning."""
from __future__ import annotations

import warnings

import pytest
import torch

from ldm.lr_schedule import advance, linear_warmup


def scheduler() -> torch.optim.lr_scheduler.LambdaLR:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    return torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup(4))


def test_a_skipped_first_step_advances_the_schedule_without_a_warning():
    sched = scheduler()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):  # no optimizer step at all: every one of them was skipped
            advance(sched)
    assert [str(w.message) for w in seen] == []
    assert sched.get_last_lr() == [pytest.approx(linear_warmup(4)(3))]


def test_the_schedule_moves_as_its_own_step_moves_it():
    ours, theirs = scheduler(), scheduler()
    for _ in range(6):
        for s in (ours, theirs):
            s.optimizer.step()
        advance(ours)
        theirs.step()
        assert ours.get_last_lr() == theirs.get_last_lr()
