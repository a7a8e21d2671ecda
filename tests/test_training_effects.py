"""Training options reach the math they claim to change: each stage's optimizer against a hand-written Adam(W) with
the config's lr, betas, eps and weight decay (and CLIP's groups without decay), the warm-up, ``train.lr_scale``, the
measured latent scale, ``train.grad_clip`` on every optimizer step of the autoencoder stage, under fp16 AMP too, and
the frozen autoencoder's mode after a sample grid."""
from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from omegaconf import OmegaConf

from ldm.autoencoder.lightning import AutoencoderModule
from ldm.cli.train import run
from ldm.conditioning.lightning import CLIPModule
from ldm.config import load_config
from ldm.diffusion.latent_stats import maybe_measure_scale
from ldm.diffusion.lightning import LatentDiffusionModule
from ldm.training.callbacks import SampleGrid
from ldm.training.guard import StepGuard, guarded_step
from ldm.training.optim import build_optimizer, effective_lr

GRAD_SCALES = (1.0, 1e-3, 30.0)  # gradient sizes of successive steps: the moments see changing magnitudes


def grads_for(params: list[torch.Tensor], step: int) -> list[torch.Tensor]:
    """Fixed pseudo-random gradients of step ``step``, one per parameter."""
    g = torch.Generator().manual_seed(step)
    return [torch.randn(p.shape, generator=g) * GRAD_SCALES[step % len(GRAD_SCALES)] for p in params]


def adam_reference(params: list[torch.Tensor], lrs: list[float], betas: tuple[float, float], eps: float,
                   decay: list[float], decoupled: bool) -> list[torch.Tensor]:
    """Adam (Kingma & Ba 2015, Alg. 1) by hand over ``len(lrs)`` steps of :func:`grads_for`; weight decay ``decay``
    per parameter: decoupled (AdamW: θ ← θ(1 − lr·λ) before the Adam step) or added to the gradient (L2)."""
    b1, b2 = betas
    ps = [p.detach().double().clone() for p in params]
    m = [torch.zeros_like(p) for p in ps]
    v = [torch.zeros_like(p) for p in ps]
    for n, lr in enumerate(lrs):
        for i, g in enumerate(grads_for(params, n)):
            g = g.double() + (0.0 if decoupled else decay[i]) * ps[i]
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat, v_hat = m[i] / (1 - b1 ** (n + 1)), v[i] / (1 - b2 ** (n + 1))
            if decoupled:
                ps[i] = ps[i] * (1 - lr * decay[i])
            ps[i] = ps[i] - lr * m_hat / (v_hat.sqrt() + eps)
    return ps


def take_steps(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: int,
               sched: torch.optim.lr_scheduler.LRScheduler | None = None) -> list[float]:
    """``steps`` optimizer steps on :func:`grads_for`; returns the learning rate of each."""
    lrs = []
    for n in range(steps):
        for p, g in zip(params, grads_for(params, n)):
            p.grad = g
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        if sched is not None:
            sched.step()
    return lrs


def assert_params_close(params: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for p, w in zip(params, want):
        torch.testing.assert_close(p.detach().double(), w, rtol=1e-5, atol=1e-6)


# -- optimizers --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fused", [False, True])
def test_diffusion_adamw_follows_lr_betas_eps_weight_decay_and_warmup(fused: bool) -> None:
    """The U-Net stage's AdamW: ``train.lr``, ``betas``, ``eps``, ``weight_decay`` (decoupled, on every parameter)
    and ``warmup_steps`` (lr·(10⁻⁶ + (1 − 10⁻⁶)·n/w) at step n < w, then lr), also in the fused kernel."""
    t = OmegaConf.create({"lr": 0.05, "betas": [0.8, 0.95], "eps": 0.01, "weight_decay": 0.3, "warmup_steps": 3,
                          "fused_optimizer": fused})
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((4, 3), (5,), (2, 3, 2, 2))]
    start = [p.detach().clone() for p in params]
    built = build_optimizer(SimpleNamespace(), params, t)
    opt, sched = built["optimizer"], built["lr_scheduler"]["scheduler"]
    assert bool(opt.defaults["fused"]) == fused
    lrs = take_steps(opt, params, 6, sched)
    want_lrs = [0.05 * (1e-6 + (1 - 1e-6) * n / 3) if n < 3 else 0.05 for n in range(6)]
    assert lrs == pytest.approx(want_lrs, rel=1e-9)
    assert_params_close(params, adam_reference(start, want_lrs, (0.8, 0.95), 0.01, [0.3] * 3, decoupled=True))


def test_clip_adamw_groups_decay_only_matrices() -> None:
    """The CLIP stage's AdamW: every trainable parameter in exactly one group; ``train.weight_decay`` on the ≥2-d
    weights, none on gains, biases, the class embedding and the temperature ``logit_scale``; betas and eps of the
    config. Checked against Adam by hand with those per-parameter decays."""
    cfg = load_config("configs/tiny/clip.yaml", ["train.lr=0.01", "train.eps=0.001", "train.betas=[0.7,0.9]",
                                                 "train.weight_decay=0.5"])
    module = CLIPModule(cfg)
    named = module._named_params()
    opt = module.configure_optimizers()["optimizer"]
    in_groups = [p for group in opt.param_groups for p in group["params"]]
    assert sorted(map(id, in_groups)) == sorted(id(p) for _, p in named)  # none dropped, none twice
    decay = [0.0 if p.ndim < 2 or "logit_scale" in n else 0.5 for n, p in named]
    assert decay[[n for n, _ in named].index("model.logit_scale")] == 0.0 and 0.5 in decay
    params = [p for _, p in named]
    start = [p.detach().clone() for p in params]
    lrs = take_steps(opt, params, 3)
    assert lrs == [0.01] * 3
    by_param = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert [by_param[id(p)] for p in params] == decay
    assert_params_close(params, adam_reference(start, lrs, (0.7, 0.9), 0.001, decay, decoupled=True))


def test_autoencoder_adam_follows_eps_betas_weight_decay_and_disc_lr_mult() -> None:
    """The autoencoder stage's two Adams (L2 weight decay, as ``torch.optim.Adam``): ``train.eps`` reached neither
    (they kept torch's 1e-8); the discriminator's lr is ``train.lr × train.disc_lr_mult``."""
    cfg = load_config("configs/tiny/autoencoder.yaml", ["train.lr=0.02", "train.eps=0.05", "train.betas=[0.6,0.8]",
                                                        "train.weight_decay=0.1", "train.disc_lr_mult=0.25"])
    module = AutoencoderModule(cfg)
    (opt_g, opt_d), _ = module.configure_optimizers()
    for opt, params, lr in ((opt_g, module.generator_parameters(), 0.02),
                            (opt_d, module.loss.discriminator_parameters(), 0.005)):
        start = [p.detach().clone() for p in params]
        lrs = take_steps(opt, params, 3)
        assert lrs == pytest.approx([lr] * 3)
        assert_params_close(params, adam_reference(start, lrs, (0.6, 0.8), 0.05, [0.1] * len(params),
                                                   decoupled=False))


def test_linear_lr_scale_counts_the_global_batch() -> None:
    """``train.lr_scale: linear``: lr × batch × devices × nodes × accumulation / ``train.lr_base_batch``."""
    cfg = OmegaConf.create({"data": {"batch_size": 4}, "trainer": {"accumulate_grad_batches": 5},
                            "train": {"lr": 1e-4, "lr_scale": "linear", "lr_base_batch": 8}})
    module = SimpleNamespace(config=cfg, trainer=SimpleNamespace(num_devices=2, num_nodes=3))
    assert effective_lr(module, cfg.train) == pytest.approx(1e-4 * 4 * 2 * 3 * 5 / 8)
    cfg.train.lr_scale = "none"
    assert effective_lr(module, cfg.train) == 1e-4


# -- latent scale ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shift", [False, True])
def test_measured_latent_scale_is_one_over_the_std_of_the_first_batches(shift: bool) -> None:
    """``train.scale_factor: auto``: scale = 1/std of the latents of the first ``train.scale_batches`` batches (the
    third is not read), shift = their mean with ``train.latent_shift``, else 0."""
    gen = torch.Generator().manual_seed(0)
    batches = [{"latent": torch.randn(2, 4, 3, 3, generator=gen) * 3 + 1.5} for _ in range(3)]
    got = {}
    module = SimpleNamespace(
        config=OmegaConf.create({"train": {"scale_factor": "auto", "scale_batches": 2, "latent_shift": shift}}),
        trainer=SimpleNamespace(global_step=0, world_size=1, datamodule=SimpleNamespace(scale_batches=lambda: batches)),
        net=SimpleNamespace(first_stage_model=torch.nn.Linear(1, 1)), device=torch.device("cpu"),
        set_latent_scale=lambda scale, shift: got.update(scale=scale, shift=shift))
    maybe_measure_scale(module)
    z = torch.cat([b["latent"] for b in batches[:2]]).double()
    assert got["scale"] == pytest.approx(1 / z.std(unbiased=False).item(), rel=1e-9)
    assert got["shift"] == (pytest.approx(z.mean().item(), rel=1e-9) if shift else 0.0)


# -- gradient clipping -------------------------------------------------------------------------------------------

class StepGrads(L.Callback):
    """The gradients each optimizer stepped with (read after the step: the fused kernel writes its clipped ones back)
    next to the ones backward left (the latest accumulated into each parameter before the step)."""

    def __init__(self) -> None:
        self.raw: dict[int, torch.Tensor] = {}
        self.steps: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        for p in module.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda p: self.raw.__setitem__(id(p), p.grad.detach().clone()))
        for opt in trainer.optimizers:
            opt.register_step_post_hook(self._stepped)

    def _stepped(self, opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
        self.steps.append(([self.raw[id(p)] for p in params], [p.grad.detach().clone() for p in params]))


@pytest.mark.parametrize("fused", [False, True])
def test_autoencoder_grad_clip_clips_both_optimizer_steps(tmp_path, fused: bool) -> None:
    """``train.grad_clip`` in the autoencoder stage, GAN on from the first step: the generator's and the
    discriminator's steps both take ``clip_grad_norm_``'s gradients (the discriminator's was never clipped), on the
    host path and in the fused kernel."""
    clip = 1e-3
    spy = StepGrads()
    run(["--config", "configs/tiny/autoencoder.yaml", "--run-dir", str(tmp_path), "trainer.max_steps=1",
         f"train.grad_clip={clip}", f"train.fused_optimizer={str(fused).lower()}", "train.loss.params.disc_start=0",
         "train.latent_std_batches=0", "train.image_every_n_steps=0", "logging.csv=false",
         "logging.tensorboard=false"], callbacks=[spy])
    assert len(spy.steps) == 2  # generator, then discriminator
    for raw, stepped in spy.steps:
        assert torch.nn.utils.get_total_norm(raw) > 10 * clip  # the clip binds
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in raw]
        for p, g in zip(params, raw):
            p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(params, clip)
        for got, p in zip(stepped, params):
            torch.testing.assert_close(got, p.grad, rtol=1e-5, atol=1e-12)


class Fp16Toy(L.LightningModule):
    """One weight trained by ``guarded_step`` with clip 1.0 and SGD(lr 1), so the step is minus the clipped gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.w = torch.nn.Parameter(torch.zeros(3))
        self.guard = StepGuard()

    def training_step(self, batch: torch.Tensor, i: int) -> None:
        guarded_step(self, self.optimizers(), (self.w * batch[0]).sum(), [self.w], clip=1.0)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1.0)


def test_fp16_grad_clip_clips_the_true_gradient() -> None:
    """fp16 AMP (a GradScaler, scale 1024): gradients (0.3, 0.4, 0) of norm 0.5 under clip 1.0 are not clipped, and a
    norm-5 gradient is clipped to norm 1 (``clip_grad_norm_`` of the unscaled gradients)."""
    rows = torch.tensor([[0.3, 0.4, 0.0], [3.0, 0.0, 4.0]])
    m = Fp16Toy()
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    L.Trainer(max_epochs=1, accelerator="cpu", plugins=[plugin], logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(
        m, torch.utils.data.DataLoader(rows, batch_size=1))
    torch.testing.assert_close(m.w.detach(), -(rows[0] + rows[1] / 5))


# -- modes -------------------------------------------------------------------------------------------------------

def test_a_sample_grid_leaves_the_frozen_autoencoder_in_eval_mode(tmp_path) -> None:
    """The U-Net stage's latents after a sample grid are those of the frozen autoencoder in eval mode: the grid put
    the whole model back in training mode, autoencoder included, whose dropout then acted on every later batch."""
    cfg = load_config("configs/tiny/txt2img.yaml", ["model.params.first_stage_config.params.ddconfig.dropout=0.5"])
    module = LatentDiffusionModule(cfg)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def latents() -> torch.Tensor:
        return module._latents({"image": images}, torch.Generator().manual_seed(1))

    before = latents()
    SampleGrid(tmp_path, ["a red apple"], 1, steps=2).sample(SimpleNamespace(loggers=[]), module, 1)
    torch.testing.assert_close(latents(), before, rtol=0, atol=0)
    assert not module.net.first_stage_model.training and module.net.training  # each part back in its own mode
