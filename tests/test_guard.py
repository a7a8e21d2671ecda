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
        self.taken: list[bool] = []  # whether each batch's step changed the weights
        self.advanced: list[bool] = []  # whether guarded_step told the caller to advance its schedule and EMA

    def training_step(self, batch, i):
        loss = (self.w * batch[0]).sum()
        if i in self.bad_loss:
            loss = loss * float("nan")
        if i in self.bad_grad:  # finite value (0), infinite gradient: d/dw sqrt(0·w) = inf
            loss = loss + torch.sqrt((self.w * 0).abs()).sum()
        before = self.w.detach().clone()
        self.advanced.append(guarded_step(self, self.optimizers(), loss, [self.w], clip=1.0))
        self.taken.append(not torch.equal(before, self.w.detach()))  # a skipped step leaves the weights alone

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
    assert m.advanced == [True] * 6  # a skip is a zero update: the schedule and the EMA advance, as on the device
    assert m.guard.skipped == 3 and m.guard.consecutive == 0 and torch.isfinite(m.w).all()
    assert "non-finite loss" in caplog.text and "non-finite gradients" in caplog.text


def test_repeated_failure_stops_the_run_with_a_message():
    with pytest.raises(NonFiniteError, match="3 consecutive steps had non-finite loss"):
        fit(Toy(bad_loss={0, 1, 2, 3}, max_consecutive=3))


class MomentumToy(Toy):
    """The Toy with SGD momentum (optimizer state that a skipped step must leave alone); records ``global_step`` and
    the momentum buffer after each batch."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.steps: list[int] = []
        self.buffers: list[torch.Tensor] = []

    def training_step(self, batch, i):
        super().training_step(batch, i)
        self.steps.append(self.global_step)
        self.buffers.append(self.optimizers().optimizer.state[self.w]["momentum_buffer"].clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def test_a_step_skipped_on_the_host_counts_in_global_step_and_max_steps():
    """Host path (SGD on the CPU): the skipped steps advance ``trainer.global_step`` as the fused path's zero updates
    do, so ``max_steps=5`` runs 5 batches (windows), skips included, and ``global_step`` stays the window index of
    the ``train/*`` rows; the weights and the momentum move only on the 3 steps taken."""
    m = MomentumToy(bad_loss={1}, bad_grad={3})
    trainer = L.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(m, torch.utils.data.DataLoader(torch.ones(8, 3), batch_size=1))
    assert m.taken == [True, False, True, False, True]
    assert trainer.global_step == 5 and m.steps == [1, 2, 3, 4, 5]
    assert m.guard.skipped == 2 and m.guard.consecutive == 0
    assert torch.equal(m.buffers[1], m.buffers[0]) and torch.equal(m.buffers[3], m.buffers[2])
    w = torch.nn.Parameter(torch.ones(3))  # the same 3 steps taken alone
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    for _ in range(3):
        w.sum().backward()
        torch.nn.utils.clip_grad_norm_([w], 1.0)
        opt.step()
        opt.zero_grad()
    torch.testing.assert_close(m.w.detach(), w.detach(), rtol=1e-6, atol=1e-7)


def test_counting_a_skipped_step_needs_lightnings_optimizer():
    """Without the training loop's ``LightningOptimizer`` (a plain torch optimizer, or one outside ``fit``) there is
    no step counter to advance: nothing happens."""
    from lightning.pytorch.core.optimizer import LightningOptimizer

    from ldm.training.guard import count_skipped_step

    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    count_skipped_step(opt)
    count_skipped_step(LightningOptimizer(opt))
    assert not opt.state and torch.equal(w.detach(), torch.ones(3))


@pytest.mark.parametrize("which", [0, 1], ids=["generator", "discriminator"])
def test_the_autoencoder_stage_keeps_one_step_per_batch_through_a_host_skip(tmp_path, which):
    """The autoencoder stage on the CPU (host path), NaN gradients in batch 2 for the generator's step (through
    Lightning's optimizer: the skip counts in ``global_step``) or the discriminator's (``UncountedStep``: never
    counted): either way ``global_step`` stays the batch count, so ``max_steps=3`` trains 3 batches, and the
    checkpoint's step and data position agree; both schedules step 3 times, the skip a zero update as on the
    device."""
    from test_amp_skips import NanGradients

    from ldm.cli.train import run

    trainer = run(["--config", "configs/tiny/autoencoder.yaml", "--run-dir", str(tmp_path), "trainer.max_steps=3",
                   "train.loss.params.disc_start=0", "train.latent_std_batches=0", "train.image_every_n_steps=0",
                   "logging.tensorboard=false"], callbacks=[NanGradients(batch=2, which=which)])
    m = trainer.lightning_module
    assert (m.guard.skipped, m.guard.amp_skipped) == (1, 0)
    assert trainer.global_step == 3 and m.batches_seen == 3
    schedules = [int(s.last_epoch) for s in m.lr_schedulers()]
    assert schedules == [3, 3]
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert (ckpt["global_step"], ckpt["batches_seen"]) == (3, 3)


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


class FusedToy(Toy):
    """The same, with fused AdamW: skips stay on the device (``found_inf``), counts are read at log steps only."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.reads: list[int] = []  # host reads inside each guarded_step

    def training_step(self, batch, i):
        GPU.step = i  # the stand-in GPU has finished every earlier step
        loss = (self.w * batch[0]).sum()
        if i in self.bad_loss:
            loss = loss * float("nan")
        if i in self.bad_grad:
            loss = loss + torch.sqrt((self.w * 0).abs()).sum()
        before = self.w.detach().clone()
        with count_host_reads() as reads:
            took = guarded_step(self, self.optimizers(), loss, [self.w], clip=1.0)
        assert took  # the caller advances schedule and EMA: a skip is a zero update
        self.taken.append(not torch.equal(before, self.w.detach()))
        self.reads.append(reads[0])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1, fused=True)


class GPU:
    """A stand-in for a GPU one step behind the host: an event recorded in step s has passed once step s + 1 runs."""

    step = 0
    waits = 0

    class Event:
        def __init__(self):
            self.step = GPU.step

        def query(self):
            return GPU.step > self.step

        def synchronize(self):
            GPU.waits += not self.query()

    class HostCopy:
        """The pinned copy: on the host once the event has passed, read without a sync (numpy, not counted)."""

        def __init__(self, t):
            self.t = t.clone()

        def tolist(self):
            return self.t.numpy().tolist()

    @staticmethod
    def copy_to_host(t):
        return GPU.HostCopy(t), GPU.Event()


@pytest.fixture
def gpu_one_step_behind(monkeypatch):
    """The guard's device counts travel as on a GPU: copied at once, readable a step later."""
    import ldm.training.step_log as step_log

    GPU.step, GPU.waits = 0, 0
    monkeypatch.setattr(step_log, "copy_to_host", GPU.copy_to_host)
    monkeypatch.setattr(step_log, "on_host", lambda t: False)  # the CPU tensors stand for device ones
    return GPU


class count_host_reads:
    """Counts Tensor.item/cpu/tolist/__bool__ calls (each a host sync on a GPU) inside the block."""

    NAMES = ("item", "cpu", "tolist", "__bool__", "__float__", "__int__")

    def __enter__(self):
        self.count, self.saved = [0], {n: getattr(torch.Tensor, n) for n in self.NAMES}
        for n, f in self.saved.items():
            def wrapped(t, *a, _f=f, **k):
                self.count[0] += 1
                return _f(t, *a, **k)
            setattr(torch.Tensor, n, wrapped)
        return self.count

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)


def fit_logging_every(module, n, every):
    data = torch.utils.data.DataLoader(torch.ones(n, 3), batch_size=1)
    L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, log_every_n_steps=every).fit(module, data)
    return module


def test_fused_optimizer_skips_on_the_device_without_host_reads(caplog, gpu_one_step_behind):
    m = fit_logging_every(FusedToy(bad_loss={1}, bad_grad={3, 4}), 8, every=4)
    assert m.taken == [True, False, True, False, False, True, True, True]  # weights untouched on the bad steps
    opt = m.optimizers().optimizer
    assert int(opt.state[m.w]["step"]) == 5  # Adam's step count (bias correction) only counts taken steps
    assert m.reads == [0] * 8 and gpu_one_step_behind.waits == 0  # no host read, no wait for the GPU
    # the counts read at step 3 took effect in step 4; step 7's are still on their way
    assert "2 non-finite step(s) skipped on every rank up to step 3 (2 skipped so far)" in caplog.text
    assert m.guard.skipped == 2 and len(m.guard._reads) == 1
    m.guard.flush(None)  # at a checkpoint or the end of training: read at once
    assert m.guard.skipped == 3 and m.guard.consecutive == 0 and torch.isfinite(m.w).all()
    assert gpu_one_step_behind.waits == 2  # for the read on its way and for the flush's own
    assert "1 non-finite step(s) skipped on every rank up to step 7 (3 skipped so far)" in caplog.text


def test_fused_optimizer_stops_after_too_many_skips_in_a_row_at_the_next_read(gpu_one_step_behind):
    m = FusedToy(bad_loss={2, 3, 4}, max_consecutive=3)
    with pytest.raises(NonFiniteError, match="3 consecutive steps had non-finite losses or gradients up to step 7"):
        fit_logging_every(m, 12, every=8)
    # read in the 8th step, applied in the 9th: a run that good steps ended is still caught, a log interval late
    assert len(m.taken) == 8 and gpu_one_step_behind.waits == 0


def test_device_counts_read_on_the_host_right_away_off_the_gpu(caplog):
    m = fit_logging_every(FusedToy(bad_loss={1}, bad_grad={3, 4}), 8, every=4)  # CPU tensors: no event to wait for
    assert m.guard.skipped == 3 and not m.guard._reads


def test_pending_device_counts_are_read_into_the_checkpoint_state():
    g = StepGuard()
    for ok in (True, False, False, True, False):
        g.record_on_device(torch.tensor(ok))
    assert g.state_dict() == {"skipped": 3, "consecutive": 1, "amp_skipped": 0, "amp_consecutive": 0}
    g.record_on_device(torch.tensor(False))
    h = StepGuard()
    h.load_state_dict(g.state_dict())
    h.record_on_device(torch.tensor(False))
    assert h.state_dict()["skipped"] == 5 and h.state_dict()["consecutive"] == 3  # the run goes on across a resume


def _min_over_two_ranks(rank: int, port: int, out: str) -> None:
    from types import SimpleNamespace

    from ldm.training.guard import min_over_ranks

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        module = SimpleNamespace(trainer=SimpleNamespace(world_size=2), device=torch.device("cpu"))
        flags = torch.tensor([1.0, 0.0]) if rank == 0 else torch.tensor([0.0, 1.0])  # each rank sees one bad flag
        torch.save(min_over_ranks(module, flags), f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_decide_together(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_min_over_two_ranks, args=(port, str(tmp_path / "flags")), nprocs=2)
    for rank in (0, 1):  # loss bad on rank 1, gradients bad on rank 0: both ranks skip, for both reasons
        assert torch.load(tmp_path / f"flags.{rank}", weights_only=True).tolist() == [0.0, 0.0]


def test_the_fused_step_clips_as_clip_grad_norm_does(gpu_one_step_behind):
    """The clip folded into fused AdamW (its ``grad_scale``) gives the weights of ``clip_grad_norm_`` then the step.
    Gradients whose norms go from 0.05 to 20 across steps, so that clipping changes Adam's moments (Adam alone is
    nearly blind to a constant scale): without the clip the weights come out elsewhere."""
    rows = torch.tensor([[20.0, -3.0, 1.0], [0.05, 0.02, -0.01], [4.0, 4.0, 4.0], [0.3, -0.2, 0.1]]).repeat(2, 1)

    def reference(clip):
        w = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.AdamW([w], lr=0.1, fused=True)
        for x in rows:
            (w * x).sum().backward()
            if clip:
                torch.nn.utils.clip_grad_norm_([w], 1.0)
            opt.step()
            opt.zero_grad()
        return w.detach()

    m = FusedToy()
    L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(m, torch.utils.data.DataLoader(rows, batch_size=1))
    assert m.reads == [0] * len(rows) and not hasattr(m.optimizers().optimizer, "grad_scale")
    torch.testing.assert_close(m.w.detach(), reference(clip=True), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(m.w.detach(), reference(clip=False), rtol=1e-3)



class ClipNet(L.LightningModule):
    """Weights of several sizes (the multi-tensor kernels' chunks) trained by ``guarded_step``, clip 1.0, AdamW fused
    (the clip in its kernel) or not (the host path's own clip)."""

    SHAPES = ((1000, 300), (7,), (64, 3, 3, 3))

    def __init__(self, fused: bool = True):
        super().__init__()
        self.automatic_optimization = False
        self.fused = fused
        gen = torch.Generator().manual_seed(0)
        self.ws = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(s, generator=gen)) for s in self.SHAPES])
        self.guard = StepGuard()

    def training_step(self, batch, i):
        loss = sum((w * x).sum() for w, x in zip(self.ws, batch))  # ∇w = x
        guarded_step(self, self.optimizers(), loss, list(self.ws), clip=1.0)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.01, fused=self.fused)


def clip_net_batches() -> list[tuple[torch.Tensor, ...]]:
    """Gradients whose norms go from ~0.05 to ~550 (clip 1.0): some steps clipped, some not."""
    gen = torch.Generator().manual_seed(1)
    return [tuple(s * torch.randn(shape, generator=gen) for shape in ClipNet.SHAPES)
            for s in (0.1, 1e-4, 0.01, 1e-3, 1.0, 3e-4, 0.02, 1e-4)]


def clip_net_reference(batches, device: str, fused: bool, clip: bool) -> list[torch.Tensor]:
    """The same training with ``clip_grad_norm_`` (or no clip) before each step."""
    ref = ClipNet(fused).to(device)
    opt = ref.configure_optimizers()
    for xs in batches:
        sum((w * x.to(device)).sum() for w, x in zip(ref.ws, xs)).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(list(ref.ws), 1.0)
        opt.step()
        opt.zero_grad()
    return [w.detach() for w in ref.ws]


def check_clip_net(device: str, fused: bool, rtol: float, atol: float) -> None:
    batches = clip_net_batches()
    m = ClipNet(fused)
    L.Trainer(max_epochs=1, accelerator="gpu" if device == "cuda" else "cpu", devices=1, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False).fit(
        m, torch.utils.data.DataLoader(batches, batch_size=None))
    assert m.guard.skipped == 0 and not hasattr(m.optimizers().optimizer, "grad_scale")
    got = [w.detach().cpu() for w in m.ws]  # Lightning moves the module back to the CPU after fit
    for g, want in zip(got, clip_net_reference(batches, device, fused, clip=True)):
        torch.testing.assert_close(g, want.cpu(), rtol=rtol, atol=atol)
    unclipped = clip_net_reference(batches, device, fused, clip=False)
    assert not torch.allclose(got[0], unclipped[0].cpu(), rtol=1e-3)


def test_the_host_step_clips_as_clip_grad_norm_does():
    """Not fused (the CPU stages, SGD, plain AdamW): the step is taken on the host after the guard's own clip."""
    check_clip_net("cpu", fused=False, rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
def test_the_fused_step_clips_as_clip_grad_norm_does_on_a_gpu():
    """The CUDA fused AdamW kernel with the clip as its ``grad_scale``: the weights of ``clip_grad_norm_`` then the
    step, on the GPU."""
    check_clip_net("cuda", fused=True, rtol=1e-5, atol=1e-6)
