"""The stage losses against the originals, written out here from their code, on identical tensors:

- the KL autoencoder's ``LPIPSWithDiscriminator`` (CompVis latent-diffusion ``ldm/modules/losses/contperceptual.py``
  with taming-transformers' ``hinge_d_loss``/``vanilla_d_loss``/``adopt_weight``), every option changing the loss
  (and its gradients) as there; the adaptive weight on the decoder's last layer; each optimizer stepping only its
  own parameters in a real run;
- the CLIP stage: open_clip's weight-decay exclusions, ``logit_scale`` = ln(1/0.07) at init and clamped to ln 100
  after each step, and the training step's loss equal to open_clip's ``ClipLoss``.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F

from ldm.autoencoder import AutoencoderKL
from ldm.autoencoder.losses import LPIPSWithDiscriminator, NLayerDiscriminator

TINY = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
            num_res_blocks=1, attn_resolutions=[], dropout=0.0)
BASE = dict(disc_start=5, logvar_init=0.3, kl_weight=1e-6, disc_factor=1.0, disc_weight=0.5, perceptual_weight=0.0,
            disc_loss="hinge", disc_num_layers=3)


# -- the original, written out ---------------------------------------------------------------------------------
def ref_kl(parameters: torch.Tensor) -> torch.Tensor:
    """latent-diffusion ``DiagonalGaussianDistribution(parameters).kl()``: (B,)."""
    mean, logvar = torch.chunk(parameters, 2, dim=1)
    logvar = torch.clamp(logvar, -30.0, 20.0)
    var = torch.exp(logvar)
    return 0.5 * torch.sum(torch.pow(mean, 2) + var - 1.0 - logvar, dim=[1, 2, 3])


def ref_hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    loss_real = torch.mean(F.relu(1. - logits_real))
    loss_fake = torch.mean(F.relu(1. + logits_fake))
    return 0.5 * (loss_real + loss_fake)


def ref_vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (torch.mean(F.softplus(-logits_real)) + torch.mean(F.softplus(logits_fake)))


def ref_adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.) -> float:
    if global_step < threshold:
        weight = value
    return weight


def ref_loss(h: dict[str, Any], logvar: torch.Tensor, discriminator: Callable, perceptual_loss: Callable | None,
             inputs: torch.Tensor, reconstructions: torch.Tensor, parameters: torch.Tensor, optimizer_idx: int,
             global_step: int, last_layer: torch.Tensor) -> torch.Tensor:
    """``LPIPSWithDiscriminator.forward`` of contperceptual.py (weights=None, cond=None), with hyper-parameters
    ``h`` (the constructor's names)."""
    rec_loss = torch.abs(inputs.contiguous() - reconstructions.contiguous())
    if h["perceptual_weight"] > 0:
        p_loss = perceptual_loss(inputs.contiguous(), reconstructions.contiguous())
        rec_loss = rec_loss + h["perceptual_weight"] * p_loss
    nll_loss = rec_loss / torch.exp(logvar) + logvar
    nll_loss = torch.sum(nll_loss) / nll_loss.shape[0]
    kl_loss = ref_kl(parameters)
    kl_loss = torch.sum(kl_loss) / kl_loss.shape[0]
    disc_factor = ref_adopt_weight(h["disc_factor"], global_step, threshold=h["disc_start"])
    if optimizer_idx == 0:
        g_loss = -torch.mean(discriminator(reconstructions.contiguous()))
        d_weight = torch.tensor(0.0, dtype=nll_loss.dtype)
        if h["disc_factor"] > 0.0:  # calculate_adaptive_weight
            nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
            g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
            d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
            d_weight = torch.clamp(d_weight, 0.0, 1e4).detach() * h["disc_weight"]
        return nll_loss + h["kl_weight"] * kl_loss + d_weight * disc_factor * g_loss
    logits_real = discriminator(inputs.contiguous().detach())
    logits_fake = discriminator(reconstructions.contiguous().detach())
    d_loss_fn = ref_hinge_d_loss if h["disc_loss"] == "hinge" else ref_vanilla_d_loss
    return disc_factor * d_loss_fn(logits_real, logits_fake)


# -- helpers ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, torch.nn.Module]:
    """An LPIPS-VGG state dict (the lpips package's shipped lin weights on a random VGG: none downloaded) and
    the lpips package's own module, the reference metric (inputs in [-1, 1])."""
    import lpips as lpips  # test-only reference

    torch.manual_seed(1)
    ref = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval().double()
    path = tmp_path_factory.mktemp("lpips") / "lpips_vgg.pth"
    torch.save(ref.state_dict(), path)
    return str(path), ref


def build(h: dict[str, Any], lpips_path: str | None) -> tuple[AutoencoderKL, LPIPSWithDiscriminator]:
    """A tiny AE and the loss with ``h``, float64; the discriminator's weights depend on its shape only."""
    torch.manual_seed(0)
    ae = AutoencoderKL(TINY, embed_dim=4).double()
    loss = LPIPSWithDiscriminator(**h, disc_ndf=8, perceptual_weights_path=lpips_path).double()
    torch.manual_seed(2)
    loss.discriminator.load_state_dict(NLayerDiscriminator(3, 8, h["disc_num_layers"]).state_dict())
    return ae, loss


def lpips_for(h: dict[str, Any], request: pytest.FixtureRequest) -> tuple[str | None, torch.nn.Module | None]:
    """The LPIPS file and reference module where ``h`` uses the perceptual loss (built only then: it is slow)."""
    return request.getfixturevalue("lpips_file") if h["perceptual_weight"] > 0 else (None, None)


def both_losses(h: dict[str, Any], step: int, request: pytest.FixtureRequest) -> dict[str, torch.Tensor]:
    """Ours and the original's generator and discriminator losses with their gradients (AE + logvar for the
    generator, the discriminator's parameters for it), on the same tensors, float64."""
    lpips_path, lpips_ref = lpips_for(h, request)
    ae, loss = build(h, lpips_path)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    x_rec, post = ae(x, sample_posterior=True, generator=g)
    last = ae.get_last_layer()
    gen_params = list(ae.parameters()) + [loss.logvar]
    d_params = list(loss.discriminator.parameters())
    out: dict[str, torch.Tensor] = {}
    for who, fn in (("ours", None), ("ref", ref_loss)):
        if fn is None:
            lg, _ = loss(x, x_rec, post, 0, step, last_layer=last)
            ld, _ = loss(x, x_rec, post, 1, step)
        else:
            args = (h, loss.logvar, loss.discriminator, lpips_ref, x, x_rec, post.parameters)
            lg, ld = fn(*args, 0, step, last), fn(*args, 1, step, last)
        out[f"{who}_g"], out[f"{who}_d"] = lg.detach(), ld.detach()
        out[f"{who}_gg"] = flat_grad(lg, gen_params)
        out[f"{who}_dg"] = flat_grad(ld, d_params)
    return out


def flat_grad(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    if not loss.requires_grad:
        return torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, params)])


def assert_same(o: dict[str, torch.Tensor]) -> None:
    for k in ("g", "d", "gg", "dg"):
        torch.testing.assert_close(o[f"ours_{k}"], o[f"ref_{k}"], rtol=1e-9, atol=1e-12, msg=k)


# -- autoencoder: the loss and its options against the original ------------------------------------------------
# option -> (value, which of (generator loss, discriminator loss) it changes after disc_start)
OPTIONS = {
    "kl_weight": (0.5, "g"),
    "disc_weight": (2.0, "g"),
    "disc_factor": (0.25, "gd"),
    "logvar_init": (-1.0, "g"),
    "disc_loss": ("vanilla", "d"),
    "perceptual_weight": (0.7, "g"),
    "disc_num_layers": (2, "gd"),
}


@pytest.fixture(scope="module")
def base_after(request: pytest.FixtureRequest) -> dict[str, torch.Tensor]:
    return both_losses(BASE, BASE["disc_start"], request)


@pytest.mark.parametrize("step", [BASE["disc_start"] - 1, BASE["disc_start"]])
def test_autoencoder_loss_equals_the_original(step: int, request, base_after) -> None:
    o = both_losses(BASE, step, request) if step < BASE["disc_start"] else base_after
    assert_same(o)
    before = step < BASE["disc_start"]
    assert (o["ours_d"].item() == 0.0 and o["ours_dg"].abs().max() == 0) == before  # f(step) = 0 before disc_start
    if before:  # the GAN term adds nothing to the generator before disc_start
        assert not torch.allclose(o["ours_g"], base_after["ours_g"])


@pytest.mark.parametrize("name", list(OPTIONS))
def test_each_option_changes_the_loss_as_the_original(name: str, request, base_after) -> None:
    value, changes = OPTIONS[name]
    o = both_losses({**BASE, name: value}, BASE["disc_start"], request)
    assert_same(o)
    for k in ("g", "d"):
        differs = not torch.allclose(o[f"ours_{k}"], base_after[f"ours_{k}"], rtol=1e-6, atol=0)
        assert differs == (k in changes), (name, k)


def test_pixelloss_weight_scales_the_l1_term() -> None:
    """The original stored ``pixelloss_weight`` without using it; here it scales |x − x̂| (documented)."""
    ae, loss = build({**BASE, "pixelloss_weight": 2.0}, None)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64) * 2 - 1
    x_rec, post = ae(x, sample_posterior=False)
    s = loss.logvar.detach()
    total, logs = loss(x, x_rec.detach(), post, 0, 0, last_layer=ae.get_last_layer())
    torch.testing.assert_close(logs["train/nll_loss"], ((2.0 * (x - x_rec).abs()) / s.exp() + s).sum().detach() / 2)


def test_adaptive_weight_is_measured_on_the_decoders_last_layer() -> None:
    """``get_last_layer`` is the weight of the last layer the decoder applies (its output conv)."""
    torch.manual_seed(0)
    ae = AutoencoderKL(TINY, embed_dim=4)
    order: list[torch.nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: order.append(mod)) for m in ae.decoder.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm))]
    with torch.no_grad():
        out = ae.decode(torch.randn(1, 4, 16, 16))
    for h in hooks:
        h.remove()
    assert order[-1].weight is ae.get_last_layer() and out.shape == (1, 3, 32, 32)


def test_sd_recipe_config_is_the_originals_loss() -> None:
    """configs/autoencoder/kl-f8.yaml against latent-diffusion's autoencoder_kl_32x32x4.yaml and its optimizer,
    which trained neither ``logvar`` (not in ``opt_ae``) nor with LPIPS absent (weight 1: here off, no weights)."""
    from ldm.config import load_config
    from ldm.registry import instantiate

    cfg = load_config("configs/autoencoder/kl-f8.yaml")
    loss = instantiate(cfg.train.loss, "train.loss")
    assert (loss.disc_start, loss.kl_weight, loss.disc_weight, loss.disc_factor) == (50001, 1e-6, 0.5, 1.0)
    assert loss.logvar.item() == 0.0 and loss.autoencoder_parameters() == [] and not loss.logvar.requires_grad
    assert loss.disc_loss.__name__ == "hinge_d_loss" and len(loss.discriminator.main) == 12  # 3 layers, ndf 64
    assert (float(cfg.train.lr), tuple(cfg.train.betas)) == (4.5e-6, (0.5, 0.9))


# -- autoencoder: a real run -----------------------------------------------------------------------------------
def test_each_optimizer_steps_only_its_parameters(tmp_path, monkeypatch) -> None:
    """In a Lightning run with the GAN on from step 1: the generator's optimizer changes the AE and logvar but not
    the discriminator (whose gradients its backward fills), the discriminator's changes only the discriminator;
    the adaptive weight is measured on ``autoencoder.get_last_layer()``."""
    import ldm.autoencoder.lightning as ae_lightning
    import ldm.autoencoder.losses as losses
    from ldm.cli.train import run

    seen: list[tuple[str, set[str]]] = []
    last_layers: list[torch.Tensor] = []
    real_step, real_weight = ae_lightning.guarded_step, losses.adaptive_weight

    def spy_step(module: Any, optimizer: Any, *args: Any, **kwargs: Any) -> bool:
        before = {n: p.detach().clone() for n, p in module.named_parameters()}
        ok = real_step(module, optimizer, *args, **kwargs)
        changed = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
        seen.append(("d" if isinstance(optimizer, ae_lightning.UncountedStep) else "g", changed))
        return ok

    def spy_weight(nll: torch.Tensor, g: torch.Tensor, last_layer: torch.Tensor, *a: Any, **k: Any) -> torch.Tensor:
        last_layers.append(last_layer)
        return real_weight(nll, g, last_layer, *a, **k)

    monkeypatch.setattr(ae_lightning, "guarded_step", spy_step)
    monkeypatch.setattr(losses, "adaptive_weight", spy_weight)
    trainer = run(["--config", "configs/tiny/autoencoder.yaml", "--run-dir", str(tmp_path), "trainer.max_steps=2",
                   "train.loss.params.disc_start=1", "train.latent_std_batches=0", "train.image_every_n_steps=0"])
    module = trainer.lightning_module
    disc = {n for n, _ in module.named_parameters() if n.startswith("loss.discriminator.")}
    gen = {n for n, _ in module.named_parameters()} - disc
    assert [w for w, _ in seen] == ["g", "g", "d"]  # disc_start = 1
    for who, changed in seen:
        mine, other = (gen, disc) if who == "g" else (disc, gen)
        assert changed and changed <= mine and not changed & other, who
    assert "loss.logvar" in seen[0][1]
    assert len(last_layers) == 1 and last_layers[0] is module.autoencoder.decoder.conv_out.weight


# -- CLIP stage ------------------------------------------------------------------------------------------------
def open_clip_exclude(n: str, p: torch.nn.Parameter) -> bool:
    """open_clip_train/main.py: the parameters AdamW does not decay."""
    return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n


@pytest.fixture(scope="module")
def clip_module() -> Any:
    from ldm.conditioning.lightning import CLIPModule
    from ldm.config import load_config

    torch.manual_seed(0)
    return CLIPModule(load_config("configs/tiny/clip.yaml"))


def test_clip_weight_decay_groups_are_open_clips(clip_module) -> None:
    named = [(n, p) for n, p in clip_module.encoder.named_parameters() if p.requires_grad]
    opt = clip_module.configure_optimizers()["optimizer"]
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert {g["weight_decay"] for g in opt.param_groups} == {0.2, 0.0}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(named)
    for n, p in named:
        assert (id(p) in decayed) == (not open_clip_exclude(n, p)), n
    # open_clip decays the 2-d embeddings (token, positional) and excludes the 1-d class embedding
    names = {n for n, p in named if id(p) in decayed}
    assert {"model.token_embedding.weight", "model.positional_embedding"} <= names
    assert "model.visual.class_embedding" not in names and "model.logit_scale" not in names


@pytest.mark.parametrize("arch", ["ViT-B-32", "RN50", "ViT-H-14", "coca_ViT-B-32"])
def test_clip_no_decay_is_open_clips_rule_on_bundled_architectures(arch: str) -> None:
    """``no_decay`` on every parameter of open_clip's bundled models (built on the meta device: no memory)."""
    import open_clip

    from ldm.conditioning.lightning import no_decay

    with torch.device("meta"):
        model = open_clip.create_model(arch, pretrained=None, device="meta")
    named = [(f"model.{n}", p) for n, p in model.named_parameters()]
    assert len(named) > 100
    assert [n for n, p in named if no_decay(n, p) != open_clip_exclude(n, p)] == []


def test_clip_logit_scale_starts_at_one_over_0_07(clip_module) -> None:
    assert clip_module.logit_scale.item() == pytest.approx(math.log(1 / 0.07), rel=1e-6)
    assert clip_module.logit_scale.requires_grad


def test_clip_training_step_is_open_clips_loss_and_clamps_the_scale(tmp_path, monkeypatch) -> None:
    """In a Lightning run: the loss is open_clip's ``ClipLoss`` on unit features with s = exp(t), and t is clamped
    to ln 100 after the step (t starts at 5 > ln 100 here)."""
    from open_clip.loss import ClipLoss

    import ldm.conditioning.lightning as clip_lightning
    import ldm.conditioning.text_encoder as text_encoder
    from ldm.checkpoint import read_state_dict
    from ldm.cli.train import run

    calls: list[tuple[torch.Tensor, ...]] = []
    real_loss, real_build = clip_lightning.clip_loss, text_encoder._build_clip

    def spy_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, *a: Any, **k: Any) -> Any:
        out = real_loss(img, txt, scale, *a, **k)
        calls.append((img.detach().clone(), txt.detach().clone(), scale.detach().clone(), out[0].detach()))
        return out

    def hot_build(*a: Any, **k: Any) -> torch.nn.Module:
        model = real_build(*a, **k)
        with torch.no_grad():
            model.logit_scale.fill_(5.0)
        return model

    logged: list[dict[str, Any]] = []
    real_log = clip_lightning.log_step
    monkeypatch.setattr(clip_lightning, "log_step", lambda m, values, **k: (logged.append(dict(values)),
                                                                           real_log(m, values, **k)))
    monkeypatch.setattr(clip_lightning, "clip_loss", spy_loss)
    monkeypatch.setattr(text_encoder, "_build_clip", hot_build)
    run(["--config", "configs/tiny/clip.yaml", "--run-dir", str(tmp_path), "trainer.max_steps=1"])
    (img, txt, scale, loss), = calls
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(len(img)))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(len(txt)))
    assert scale.item() == pytest.approx(math.exp(5.0), rel=1e-6)
    torch.testing.assert_close(loss, ClipLoss()(img, txt, scale), rtol=1e-6, atol=1e-6)
    # logged values hold no autograd graph (the loss was logged with it: a warning each CPU step)
    assert logged and not [k for v in logged for k, x in v.items() if torch.is_tensor(x) and x.requires_grad]
    sd, _ = read_state_dict(tmp_path / "model.safetensors")
    assert sd["model.logit_scale"].item() == pytest.approx(math.log(100.0), rel=1e-6)


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_half_precision_weights_are_refused_up_front(precision: str) -> None:
    """Half-precision weights (``*-true``) crashed the run only when the discriminator switched on (fp32 inputs into
    a bf16 patch-GAN, step 50001 of the SD recipe), and Adam's lr-sized updates round away in bf16 weights anyway."""
    from ldm.autoencoder.lightning import AutoencoderModule
    from ldm.config import load_config
    from ldm.registry import ConfigError

    cfg = load_config("configs/tiny/autoencoder.yaml", [f"trainer.precision={precision}"])
    with pytest.raises(ConfigError, match="trainer.precision"):
        AutoencoderModule(cfg)
    for ok in ("bf16-mixed", "32-true", "16-mixed"):
        AutoencoderModule(load_config("configs/tiny/autoencoder.yaml", [f"trainer.precision={ok}"]))


def test_clip_text_features_with_max_length_below_the_context() -> None:
    """``max_length`` < context_length (shorter prompts for the U-Net) crashed the CLIP stage's text features
    (open_clip adds all 77 positional embeddings); padded to the context they are those of the full-length ids."""
    from ldm.conditioning.text_encoder import OpenCLIPTextEncoder

    torch.manual_seed(0)
    enc = OpenCLIPTextEncoder(None, text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=2),
                              vision_cfg=dict(image_size=32, patch_size=8, width=64, head_width=32, layers=2),
                              embed_dim=64, with_visual=True, freeze=False, layer="last", max_length=32)
    prompts = ["a red apple", "two cats on a sofa"]
    ids = enc.tokenize(prompts)  # (2, 32)
    full = torch.nn.functional.pad(ids, (0, 77 - 32), value=enc.pad_token)  # (2, 77)
    with torch.no_grad():
        got, ref = enc.encode_text_features(prompts), enc.model.encode_text(full)
        torch.testing.assert_close(enc.encode_text_features(ids), ref)
    assert ids.shape == (2, 32) and got.shape == (2, 64)
    torch.testing.assert_close(got, ref)
