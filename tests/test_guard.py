"""Non-finite losses and gradients: the step is skipped and counted; repeated failure stops the run with a message."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from ldm.training.guard import NonFiniteError, StepGuard, guarded_step


class Toy(L.LightningModule):
    """One weight; batch i's loss is made non-finite (``bad_loss``) or only its gradient (``bad_grad``)."""

    def __init__(self, bad_loss=(), bad_grad=(), max_consecutive=10):
        super().__init__()
        self.automatic_optimization = False
        self.w = torch.nn.Parameter(torch.ones(3))
        self.bad_loss, self.bad_grad = set(bad_loss), set(bad_grad)
        self.guard = StepGuard(max_consecutive)
        self.taken: list[bool] = []

    def training_step(self, batch, i):
        loss = (self.w * batch[0]).sum()
        if i in self.bad_loss:
            loss = loss * float("nan")
        if i in self.bad_grad:  # finite value (0), infinite gradient: d/dw sqrt(0·w) = inf
            loss = loss + torch.sqrt((self.w * 0).abs()).sum()
        before = self.w.detach().clone()
        took = guarded_step(self, self.optimizers(), loss, [self.w], clip=1.0)
        assert torch.equal(before, self.w.detach()) != took  # a skipped step leaves the weights alone
        self.taken.append(took)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(module, n=6):
    data = torch.utils.data.DataLoader(torch.ones(n, 3), batch_size=1)
    L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, data)
    return module


def test_nonfinite_loss_and_gradients_are_skipped_and_counted(caplog):
    m = fit(Toy(bad_loss={1}, bad_grad={3, 4}))
    assert m.taken == [True, False, True, False, False, True]
    assert m.guard.skipped == 3 and m.guard.consecutive == 0 and torch.isfinite(m.w).all()
    assert "non-finite loss" in caplog.text and "non-finite gradients" in caplog.text


def test_repeated_failure_stops_the_run_with_a_message():
    with pytest.raises(NonFiniteError, match="3 consecutive steps had non-finite loss"):
        fit(Toy(bad_loss={0, 1, 2, 3}, max_consecutive=3))


def test_guard_state_round_trips():
    g = StepGuard()
    g.record(False, "loss", 5)
    h = StepGuard()
    h.load_state_dict(g.state_dict())
    assert (h.skipped, h.consecutive) == (1, 1)


def test_grad_norm_is_the_clipping_norm_and_flags_any_nonfinite_gradient():
    from ldm.training.guard import grad_norm

    torch.manual_seed(0)
    grads = [torch.randn(5, 3), torch.randn(7), torch.randn(2, 2, 3, 3)]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    ref = torch.nn.utils.clip_grad_norm_(params, 1e9)
    torch.testing.assert_close(grad_norm(grads), ref)
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = [g.clone() for g in grads]
        broken[2][1, 0, 2, 1] = bad
        assert not torch.isfinite(grad_norm(broken))
    assert float(grad_norm([])) == 0.0
