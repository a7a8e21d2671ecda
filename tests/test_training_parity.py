"""Our U-Net training loss equals the one of diffusers' training scripts, on the same tiny U-Net weights, latents,
noise and timesteps.

The reference is the loss of diffusers' ``examples/text_to_image/train_text_to_image.py``, rebuilt here from the
library API (:func:`diffusers_loss`): ``DDPMScheduler.add_noise`` for x_t, ``noise`` or ``DDPMScheduler.get_velocity``
for the target, ``UNet2DConditionModel`` (our weights, converted) for the prediction, ``F.mse_loss`` and, with
``snr_gamma``, ``diffusers.training_utils.compute_snr`` and the weights ``min(SNR, γ)/SNR`` (ε) or
``min(SNR, γ)/(SNR + 1)`` (v). Both are the min-SNR-γ weight min(SNR, γ) of the x0-loss (Hang et al. 2023, "Efficient
Diffusion Training via Min-SNR Weighting Strategy", §3.4) rewritten for the other targets: with x_t = α x0 + σ ε,
‖x0 − x̂0‖² = ‖ε − ε̂‖²/SNR and, with v = α ε − σ x0 (Salimans & Ho 2022, §4), ‖x0 − x̂0‖² = σ²‖v − v̂‖² =
‖v − v̂‖²/(SNR + 1).

Our loss takes the noise and the timesteps through its ``noise=`` and ``timesteps=`` arguments; the Lightning
training step draws them from a per-step generator, which the tests replay (:func:`replay_draws`).

Three deliberate differences, each asserted as the relation it is:

* Precision of the schedule. diffusers builds β, ᾱ and SNR in float32; we keep ᾱ in float64. 1 − ᾱ near t = 0 is
  ≈ β₀ = 8.5e-4, so float32 rounding of ᾱ (2⁻²⁴ relative) becomes ≈ 2⁻²⁴/β₀ ≈ 7e-5 in diffusers' SNR there (its
  SNR_0 is 1175.44, the exact (1 − β₀)/β₀ is 1175.47). The strict comparisons (rtol 1e-5) hand diffusers' scheduler
  our ᾱ table, so that both sides compute from the same numbers; :func:`test_with_diffusers_own_float32_schedule`
  compares with diffusers' own table within that float32 bound.
* Zero terminal SNR with ε-prediction and min-SNR: at t = T − 1, SNR = 0 and diffusers' weight min(0, γ)/0 is
  0/0 = NaN (one such sample makes the whole batch loss NaN). Ours is the limit min(SNR, γ)/SNR → 1 as SNR → 0
  (documented in :func:`ldm.diffusion.losses.min_snr_weight`): that sample keeps its plain ε-loss.
* The order of the random draws: diffusers' script draws the noise, then the timesteps; our training step draws
  the timesteps, then the noise (after the caption-dropout coin). That only decides which random numbers land where;
  the tests replay our order and compare the math given the draws.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import compute_snr

import ldm.diffusion.lightning as ldm_lightning
from ldm.config import load_config
from ldm.convert.diffusers_unet import unet_config_to_diffusers, unet_ldm_to_diffusers
from ldm.diffusion.lightning import LatentDiffusionModule
from ldm.diffusion.losses import diffusion_loss, sample_noise
from ldm.diffusion.schedules import make_betas, rescale_zero_terminal_snr

TINY = "configs/tiny/txt2img.yaml"
T = 1000
B, C, H, W = 8, 4, 4, 4  # small latents: the U-Net downsamples once
TIMESTEPS = torch.tensor([0, 3, 17, 250, 500, 777, 998, T - 1])  # both ends of the schedule included
GAMMA = 5.0
RTOL, ATOL = 1e-5, 1e-7  # float32 rounding
PREDICTION_TYPE = {"eps": "epsilon", "v": "v_prediction"}  # ours -> diffusers' name


def our_alphas_cumprod(zero_snr: bool) -> torch.Tensor:
    betas = make_betas("linear", T, 0.00085, 0.012)
    return torch.cumprod(1 - (rescale_zero_terminal_snr(betas) if zero_snr else betas), 0)  # (T,) float64


def scheduler(parameterization: str, zero_snr: bool, alphas_cumprod: torch.Tensor | None = None) -> DDPMScheduler:
    """SD's noise scheduler as the training scripts build it; ``alphas_cumprod``: our (float64) table instead of its
    float32 one (see the module docstring)."""
    s = DDPMScheduler(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type=PREDICTION_TYPE[parameterization], rescale_betas_zero_snr=zero_snr)
    if alphas_cumprod is not None:
        s.alphas_cumprod = alphas_cumprod.clone()
    return s


def diffusers_loss(sched: DDPMScheduler, unet: UNet2DConditionModel, latents: torch.Tensor, noise: torch.Tensor,
                   timesteps: torch.Tensor, context: torch.Tensor, snr_gamma: float | None = None,
                   target_fn=None, divisor_fn=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of diffusers' train_text_to_image.py given latents, noise, timesteps and text states.

    Returns (per-sample loss (B,), the scalar the script backpropagates). ``target_fn`` / ``divisor_fn`` replace the
    target or the min-SNR divisor (the sensitivity test's wrong variants)."""
    noisy_latents = sched.add_noise(latents, noise, timesteps)
    if sched.config.prediction_type == "epsilon":
        target = noise
    elif sched.config.prediction_type == "v_prediction":
        target = sched.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(sched.config.prediction_type)
    if target_fn is not None:
        target = target_fn(latents, noise, timesteps)
    with torch.no_grad():
        model_pred = unet(noisy_latents, timesteps, context, return_dict=False)[0]
    if snr_gamma is None:
        per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
        return per_sample, F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    snr = compute_snr(sched, timesteps)
    mse_loss_weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if divisor_fn is not None:
        mse_loss_weights = mse_loss_weights / divisor_fn(snr)
    elif sched.config.prediction_type == "epsilon":
        mse_loss_weights = mse_loss_weights / snr
    else:
        mse_loss_weights = mse_loss_weights / (snr + 1)
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    loss = loss.mean(dim=list(range(1, len(loss.shape)))) * mse_loss_weights
    return loss, loss.mean()


@pytest.fixture(scope="module")
def tiny() -> SimpleNamespace:
    """The tiny txt2img training module (v-prediction, zero terminal SNR, min-SNR γ = 5, offset noise, caption
    dropout, latent scale and shift) with random U-Net weights (its zero-initialised output convolution would make
    every prediction 0), the same weights in diffusers' UNet2DConditionModel, and fixed latents / noise / text."""
    cfg = load_config(TINY, ["model.params.parameterization=v", "model.params.scale_factor=0.18215",
                             f"train.min_snr_gamma={GAMMA}", "train.offset_noise=0.1", "train.caption_dropout=0.5"])
    cfg.model.params.zero_terminal_snr = True
    cfg.model.params.shift_factor = 0.0609
    module = LatentDiffusionModule(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.net.unet.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    params = dict(cfg.model.params.unet_config.params)
    unet = UNet2DConditionModel.from_config(unet_config_to_diffusers(params)).eval()
    unet.load_state_dict(unet_ldm_to_diffusers(module.net.unet.state_dict(), params), strict=True)
    return SimpleNamespace(
        module=module, net=module.net, unet=unet,
        latents=torch.randn(B, C, H, W, generator=g), noise=torch.randn(B, C, H, W, generator=g),
        context=torch.randn(B, 8, 64, generator=g))


def ours(tiny: SimpleNamespace, parameterization: str, ac: torch.Tensor, gamma: float | None, **kw) -> torch.Tensor:
    with torch.no_grad():
        return diffusion_loss(tiny.net.model, tiny.latents, {"context": tiny.context}, ac, parameterization,
                              min_snr_gamma=gamma, **({"timesteps": TIMESTEPS, "noise": tiny.noise} | kw))


def test_schedules_match_diffusers() -> None:
    """Same ᾱ as DDPMScheduler (SD's "scaled_linear", with and without Lin et al. 2023's rescale) up to diffusers'
    float32 arithmetic, the same exact 0 at T − 1 under zero terminal SNR; our SNR_0 is the exact (1 − β₀)/β₀."""
    for zero_snr in (False, True):
        ac, theirs = our_alphas_cumprod(zero_snr), scheduler("eps", zero_snr).alphas_cumprod
        assert theirs.dtype == torch.float32
        # 1000-factor float32 cumprod (+ the rescale's subtraction where ᾱ is tiny): a few 1e-5 relative at most
        torch.testing.assert_close(theirs.double(), ac, rtol=5e-5, atol=1e-9)
        assert (ac[-1].item() == 0.0) == zero_snr and (theirs[-1].item() == 0.0) == zero_snr
    ac = our_alphas_cumprod(False)
    beta0 = 0.00085
    assert (ac[0] / (1 - ac[0])).item() == pytest.approx((1 - beta0) / beta0, rel=1e-12)
    snr0 = compute_snr(scheduler("eps", False), torch.tensor([0])).item()
    assert snr0 == pytest.approx((1 - beta0) / beta0, rel=2**-24 / beta0)  # diffusers: float32-limited


@pytest.mark.parametrize("zero_snr", [False, True], ids=["sd-schedule", "zero-terminal-snr"])
def test_loss_matches_diffusers(tiny: SimpleNamespace, zero_snr: bool) -> None:
    """ε and v, plain MSE and min-SNR γ = 5: per-sample losses and the batch scalar equal diffusers' to float32
    rounding (ε with min-SNR under zero terminal SNR: see the next test)."""
    ac = our_alphas_cumprod(zero_snr)
    for p in ("eps", "v"):
        for gamma in (None, GAMMA):
            if zero_snr and p == "eps" and gamma is not None:
                continue
            ref, ref_scalar = diffusers_loss(scheduler(p, zero_snr, ac), tiny.unet, tiny.latents, tiny.noise,
                                             TIMESTEPS, tiny.context, gamma)
            got = ours(tiny, p, ac, gamma)
            msg = f"{p}, gamma={gamma}, zero_snr={zero_snr}"
            assert got.shape == (B,) and torch.isfinite(got).all(), msg
            torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL, msg=lambda m: f"{msg}: {m}")
            torch.testing.assert_close(got.mean(), ref_scalar, rtol=RTOL, atol=ATOL, msg=lambda m: f"{msg}: {m}")


def test_zero_terminal_snr_eps_min_snr_convention(tiny: SimpleNamespace) -> None:
    """At SNR = 0 (t = T − 1 under zero terminal SNR) diffusers' ε weight min(0, γ)/0 is NaN; ours is the limit 1
    of min(SNR, γ)/SNR = min(1, γ/SNR), so that sample keeps its plain ε-loss. Everywhere else: equal."""
    ac = our_alphas_cumprod(True)
    ref, ref_scalar = diffusers_loss(scheduler("eps", True, ac), tiny.unet, tiny.latents, tiny.noise, TIMESTEPS,
                                     tiny.context, GAMMA)
    got, plain = ours(tiny, "eps", ac, GAMMA), ours(tiny, "eps", ac, None)
    last = TIMESTEPS == T - 1
    assert torch.isnan(ref[last]).all() and torch.isnan(ref_scalar)  # diffusers: the batch loss is NaN
    assert torch.isfinite(ref[~last]).all() and torch.isfinite(got).all()
    torch.testing.assert_close(got[~last], ref[~last], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(got[last], plain[last], rtol=0, atol=0)  # weight exactly 1
    early = TIMESTEPS < 20  # SNR > γ there: the weight γ/SNR < 1 bites (at larger t it is 1 as well)
    assert (got[early] < 0.5 * plain[early]).all()


def test_with_diffusers_own_float32_schedule(tiny: SimpleNamespace) -> None:
    """With diffusers' own float32 ᾱ (not ours): equal within the float32 bound of its SNR near t = 0, 2⁻²⁴/β₀."""
    for p in ("eps", "v"):
        for gamma in (None, GAMMA):
            ref, _ = diffusers_loss(scheduler(p, False), tiny.unet, tiny.latents, tiny.noise, TIMESTEPS,
                                    tiny.context, gamma)
            torch.testing.assert_close(ours(tiny, p, our_alphas_cumprod(False), gamma), ref,
                                       rtol=2**-24 / 0.00085, atol=ATOL)


def test_offset_noise_is_the_usual_form(tiny: SimpleNamespace) -> None:
    """Offset noise is ``noise = randn_like(latents); noise += offset · randn(B, C, 1, 1)`` (diffusers' scripts'
    ``--noise_offset``), drawn bitwise alike from the same generator; and the loss that draws t and ε itself (no
    override) equals diffusers' on those draws, for v with min-SNR."""
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    noise = torch.randn(B, C, H, W, generator=g2)
    noise += 0.1 * torch.randn((B, C, 1, 1), generator=g2)
    assert torch.equal(sample_noise((B, C, H, W), 0.1, g1), noise)

    ac = our_alphas_cumprod(False)
    with torch.no_grad():
        got = diffusion_loss(tiny.net.model, tiny.latents, {"context": tiny.context}, ac, "v",
                             generator=torch.Generator().manual_seed(11), min_snr_gamma=GAMMA, offset_noise=0.1)
    g = torch.Generator().manual_seed(11)  # our order: timesteps, then noise, then its offset
    t = torch.randint(0, T, (B,), generator=g)
    noise = torch.randn(B, C, H, W, generator=g)
    noise += 0.1 * torch.randn((B, C, 1, 1), generator=g)
    ref, _ = diffusers_loss(scheduler("v", False, ac), tiny.unet, tiny.latents, noise, t, tiny.context, GAMMA)
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL)


def test_a_wrong_target_or_weight_is_caught(tiny: SimpleNamespace) -> None:
    """The comparison fails for each plausible mistake: ε instead of v as v's target, v with the wrong sign, the
    ε-form min-SNR divisor (SNR) for v, and no weighting at all."""
    ac = our_alphas_cumprod(False)
    got = ours(tiny, "v", ac, GAMMA)
    wrong = {
        "eps target": dict(target_fn=lambda x0, eps, t: eps),
        "-v target": dict(target_fn=lambda x0, eps, t: -scheduler("v", False, ac).get_velocity(x0, eps, t)),
        "divisor snr": dict(divisor_fn=lambda snr: snr),
        "unweighted": dict(divisor_fn=lambda snr: torch.stack([snr, GAMMA * torch.ones_like(snr)], 1).min(1)[0]),
    }
    for name, kw in wrong.items():
        ref, _ = diffusers_loss(scheduler("v", False, ac), tiny.unet, tiny.latents, tiny.noise, TIMESTEPS,
                                tiny.context, GAMMA, **kw)
        with pytest.raises(AssertionError):
            torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL)
        assert ((got - ref).abs() / ref.abs()).max() > 1e-2, name


def replay_draws(seed: int, caption_dropout: float, offset: float) -> tuple[torch.Tensor | None, ...]:
    """The random numbers of our training step, in its order: the caption-dropout coins (B,), t (B,), ε."""
    g = torch.Generator().manual_seed(seed)
    drop = torch.rand(B, generator=g) < caption_dropout if caption_dropout > 0 else None
    t = torch.randint(0, T, (B,), generator=g)
    noise = torch.randn(B, C, H, W, generator=g)
    if offset:
        noise += offset * torch.randn((B, C, 1, 1), generator=g)
    return drop, t, noise


@pytest.mark.parametrize("case", ["v-minsnr-offset-dropout", "eps-plain"])
def test_lightning_training_step_matches_diffusers(tiny: SimpleNamespace, case: str, monkeypatch) -> None:
    """``LatentDiffusionModule.training_step`` on a cached-latent batch (raw posterior samples and text states):
    the loss it backpropagates equals diffusers' script on latents ``(z − shift) · scale``, the empty-prompt text
    states where the caption is dropped (``--proportion_empty_prompts``), and the same t and ε."""
    module, seed = tiny.module, 1234
    cfg = copy.deepcopy(module.config)  # the fixture's config stays as it is
    if case == "eps-plain":
        cfg.train.min_snr_gamma, cfg.train.offset_noise, cfg.train.caption_dropout = None, 0.0, 0.0
        monkeypatch.setattr(module.net, "parameterization", "eps")
    monkeypatch.setattr(module, "config", cfg)
    monkeypatch.setattr(ldm_lightning, "step_generator", lambda m, s: torch.Generator().manual_seed(seed))
    monkeypatch.setattr(ldm_lightning, "guarded_step", lambda *a, **k: False)  # no backward / optimizer here
    monkeypatch.setattr(module, "optimizers", lambda: None)
    monkeypatch.setattr(module, "lr_schedulers", lambda: None)
    monkeypatch.setattr(module, "_log_step", lambda *a: None)
    g = torch.Generator().manual_seed(5)
    raw, context = torch.randn(B, C, H, W, generator=g), torch.randn(B, 77, 64, generator=g)
    got = module.training_step({"latent": raw, "context": context}, 0)

    p, gamma = module.net.parameterization, cfg.train.get("min_snr_gamma")
    drop, t, noise = replay_draws(seed, float(cfg.train.caption_dropout), float(cfg.train.offset_noise))
    latents = (raw - 0.0609) * 0.18215  # diffusers' SD3-style scripts: (z − shift_factor) · scaling_factor
    if drop is not None:
        assert drop.any() and not drop.all()  # both branches exercised
        with torch.no_grad():
            empty = module.net.cond_stage_model([""])  # (1, 77, 64) the text encoder on ""
        context = torch.where(drop[:, None, None], empty, context)
    ac = module.net.alphas_cumprod
    assert ac.dtype == torch.float64 and ac[-1] == 0  # the module trains on the zero-terminal-SNR schedule
    _, ref = diffusers_loss(scheduler(p, True, ac), tiny.unet, latents, noise, t, context, gamma)
    assert got.shape == () and torch.isfinite(ref)
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL)
