"""EMA: LitEma's warm-up rule, its saved counters, and the host copy of those counters across a state-dict load."""
from __future__ import annotations

import pytest
import torch

from ldm.ema import EMA


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.Linear(4, 2))


def _reference(shadow: torch.Tensor, values: list[torch.Tensor], decay: float) -> torch.Tensor:
    """LitEma, written out: n += 1; β = min(decay, (1 + n)/(10 + n)); s -= (1 − β)(s − θ)."""
    s = shadow.clone()
    for n, v in enumerate(values, start=1):
        beta = min(decay, (1 + n) / (10 + n))
        s -= (1 - beta) * (s - v)
    return s


def test_updates_follow_litema_and_count_in_the_buffer():
    net = _net()
    ema = EMA(net, decay=0.9)
    w0 = net[0].weight.detach().clone()
    seen = []
    for _ in range(5):
        with torch.no_grad():
            net[0].weight.add_(1.0)
        seen.append(net[0].weight.detach().clone())
        ema.update(net)
    assert int(ema.num_updates) == 5 and ema.current_decay() == pytest.approx(min(0.9, 6 / 15))
    torch.testing.assert_close(getattr(ema, "0weight"),
                               _reference(w0, seen, 0.9))


def test_loaded_counters_replace_the_host_copy():
    net = _net()
    a, b = EMA(net, decay=0.999), EMA(net, decay=0.5)
    for _ in range(3):
        a.update(net)
    b.current_decay()  # b has read its own counters (0 updates, decay 0.5) onto the host
    b.load_state_dict(a.state_dict())
    assert b.current_decay() == pytest.approx(min(0.999, 4 / 13))
    b.update(net)
    assert int(b.num_updates) == 4 and b.current_decay() == pytest.approx(min(0.999, 5 / 14))


def test_no_warmup_keeps_the_count_negative():
    net = _net()
    ema = EMA(net, decay=0.7, warmup=False)
    ema.update(net)
    assert int(ema.num_updates) == -1 and ema.current_decay() == pytest.approx(0.7)
