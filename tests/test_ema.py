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


@pytest.mark.parametrize("warmup", [True, False])
def test_an_update_over_several_steps_is_that_many_updates_towards_the_same_weights(warmup):
    net = _net()
    folded, single = EMA(net, decay=0.9, warmup=warmup), EMA(net, decay=0.9, warmup=warmup)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    single.update(net)
    folded.update(net)  # one step each first: the warm-up's β differs from step to step
    with torch.no_grad():
        net[0].weight.mul_(-2.0)
    for _ in range(3):
        single.update(net)
    folded.update(net, steps=3)
    assert int(folded.num_updates) == int(single.num_updates) == (4 if warmup else -1)
    assert folded.current_decay() == pytest.approx(single.current_decay())
    for name in folded.names.values():
        torch.testing.assert_close(getattr(folded, name), getattr(single, name), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="steps must be an int ≥ 1, got 0"):
        folded.update(net, steps=0)


def test_training_folds_ema_steps_every_n(tmp_path, monkeypatch):
    from ldm.cli.train import run

    calls = []
    update = EMA.update
    monkeypatch.setattr(EMA, "update", lambda self, model, steps=1: calls.append(steps) or update(self, model, steps))
    trainer = run(["--config", "configs/tiny/txt2img.yaml", "--run-dir", str(tmp_path), "trainer.max_steps=5",
                   "train.ema_decay=0.99", "train.ema_every_n_steps=2", "sample.every_n_steps=0"])
    assert calls == [2, 2]  # after steps 2 and 4; step 5 waits for step 6
    assert int(trainer.lightning_module.model_ema.num_updates) == 4
