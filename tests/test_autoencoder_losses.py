"""Autoencoder losses: GAN losses on known inputs, schedules, adaptive weight, learned logvar, LPIPS structure."""
from __future__ import annotations

import math

import pytest
import torch

from ldm.autoencoder import AutoencoderKL
from ldm.autoencoder.losses import (LPIPS, LPIPSWithDiscriminator, NLayerDiscriminator, adaptive_weight, adopt_weight,
                                    hinge_d_loss, vanilla_d_loss)

TINY = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
            num_res_blocks=1, attn_resolutions=[], dropout=0.0)
REAL, FAKE = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_hinge_and_vanilla_values() -> None:
    # relu(1 - real) = [0, .5, 2] (mean 5/6); relu(1 + fake) = [0, 1, 2.5] (mean 7/6) -> ½(5/6 + 7/6) = 1
    assert hinge_d_loss(REAL, FAKE).item() == pytest.approx(1.0)
    expected = 0.5 * (sum(softplus(-r) for r in REAL.tolist()) / 3 + sum(softplus(f) for f in FAKE.tolist()) / 3)
    assert vanilla_d_loss(REAL, FAKE).item() == pytest.approx(expected, rel=1e-6)


def test_adopt_weight_schedule() -> None:
    assert [adopt_weight(0.7, s, threshold=3) for s in range(5)] == [0.0, 0.0, 0.0, 0.7, 0.7]
    assert adopt_weight(1.0, 0, threshold=5, value=0.25) == 0.25


def test_adaptive_weight_is_the_gradient_norm_ratio() -> None:
    w = torch.nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
    a, b = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    nll, g = (w.pow(2) * a).sum(), (w * b).sum()  # ∇nll = 2·a·w, ∇g = b
    expected = 0.5 * torch.linalg.vector_norm(2 * a * w.detach()) / (torch.linalg.vector_norm(b) + 1e-4)
    lam = adaptive_weight(nll, g, w, disc_weight=0.5)
    assert lam.item() == pytest.approx(expected.item(), rel=1e-6) and not lam.requires_grad
    assert adaptive_weight((w * a).sum(), (w * 0.0).sum(), w).item() == 1e4  # clamped


def test_discriminator_layout_and_init() -> None:
    torch.manual_seed(0)
    d = NLayerDiscriminator()  # taming's NLayerDiscriminator(input_nc=3, ndf=64, n_layers=3)
    shapes = {k: tuple(v.shape) for k, v in d.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert shapes == {
        "main.0.weight": (64, 3, 4, 4), "main.0.bias": (64,), "main.2.weight": (128, 64, 4, 4),
        "main.3.weight": (128,), "main.3.bias": (128,), "main.3.running_mean": (128,), "main.3.running_var": (128,),
        "main.5.weight": (256, 128, 4, 4), "main.6.weight": (256,), "main.6.bias": (256,),
        "main.6.running_mean": (256,), "main.6.running_var": (256,), "main.8.weight": (512, 256, 4, 4),
        "main.9.weight": (512,), "main.9.bias": (512,), "main.9.running_mean": (512,), "main.9.running_var": (512,),
        "main.11.weight": (1, 512, 4, 4), "main.11.bias": (1,)}
    assert sum(p.numel() for p in d.parameters()) == 2_765_633
    assert d.main[8].weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert d.main[9].weight.mean().item() == pytest.approx(1.0, abs=0.01) and d.main[9].bias.abs().max() == 0
    assert d(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)


@pytest.fixture()
def setup() -> tuple[AutoencoderKL, LPIPSWithDiscriminator, torch.Tensor]:
    torch.manual_seed(0)
    ae = AutoencoderKL(TINY, embed_dim=4)
    loss = LPIPSWithDiscriminator(disc_start=10, disc_ndf=8, logvar_init=0.3)
    return ae, loss, torch.rand(2, 3, 32, 32) * 2 - 1


def test_defaults_follow_the_sd_recipe() -> None:
    loss = LPIPSWithDiscriminator()
    assert (loss.kl_weight, loss.disc_weight, loss.disc_start, loss.perceptual_weight) == (1e-6, 0.5, 50001, 0.0)
    assert loss.disc_loss is hinge_d_loss
    assert LPIPSWithDiscriminator(disc_loss="vanilla").disc_loss is vanilla_d_loss


def test_generator_loss_before_disc_start(setup) -> None:
    ae, loss, x = setup
    x_rec, post = ae(x)
    total, logs = loss(x, x_rec, post, 0, global_step=9, last_layer=ae.get_last_layer())
    s = loss.logvar.detach()
    nll = ((x - x_rec).abs() / s.exp() + s).sum() / 2
    expected = nll + 1e-6 * post.kl().sum() / 2
    torch.testing.assert_close(total, expected)
    assert logs["train/d_weight"].item() == 0 and logs["train/disc_factor"].item() == 0
    total.backward()
    assert all(p.grad is None for p in loss.discriminator.parameters())  # the GAN term has weight exactly 0
    d_loss, d_logs = loss(x, x_rec, post, 1, global_step=9, split="val")
    assert d_loss.item() == 0.0 and "val/logits_real" in d_logs


def test_generator_loss_after_disc_start(setup) -> None:
    ae, loss, x = setup
    x_rec, post = ae(x, sample_posterior=False)
    total, logs = loss(x, x_rec, post, 0, global_step=10, last_layer=ae.get_last_layer())
    nll, kl, g = logs["train/nll_loss"], logs["train/kl_loss"], logs["train/g_loss"]
    # λ by hand: gradient norms of L_nll and L_GAN on the decoder's last conv, times disc_weight 0.5
    s = loss.logvar
    nll_again = ((x - x_rec).abs() / s.exp() + s).sum() / 2
    g_again = -loss.discriminator(x_rec).mean()
    last = ae.get_last_layer()
    gn = torch.autograd.grad(nll_again, last, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g_again, last, retain_graph=True)[0].norm()
    lam = 0.5 * gn / (gg + 1e-4)
    torch.testing.assert_close(logs["train/d_weight"], lam.detach())
    torch.testing.assert_close(total.detach(), nll + 1e-6 * kl + lam.detach() * g)
    d_loss, _ = loss(x, x_rec, post, 1, global_step=10)
    real, fake = loss.discriminator(x), loss.discriminator(x_rec.detach())
    torch.testing.assert_close(d_loss, hinge_d_loss(real, fake))


def test_last_layer_required_while_training(setup) -> None:
    ae, loss, x = setup
    x_rec, post = ae(x)
    with pytest.raises(ValueError, match="last_layer"):
        loss(x, x_rec, post, 0, global_step=10)
    loss.eval()
    with torch.no_grad():
        _, logs = loss(x, x_rec, post, 0, global_step=10, split="val")
    assert logs["val/d_weight"].item() == 0
    with pytest.raises(ValueError, match="optimizer_idx"):
        loss(x, x_rec, post, 2, global_step=0)


@pytest.mark.parametrize("learn", [True, False])
def test_logvar_is_trained(learn: bool) -> None:
    torch.manual_seed(0)
    ae = AutoencoderKL(TINY, embed_dim=4)
    loss = LPIPSWithDiscriminator(disc_start=100, disc_ndf=8, learn_logvar=learn)
    params = list(ae.parameters()) + loss.autoencoder_parameters()
    assert any(p is loss.logvar for p in params) == learn
    assert not any(p is loss.logvar for p in loss.discriminator_parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    x_rec, post = ae(x)
    total, _ = loss(x, x_rec, post, 0, global_step=0, last_layer=ae.get_last_layer())
    total.backward()
    opt.step()
    assert (loss.logvar.item() != 0.0) == learn


def test_perceptual_loss_needs_a_local_file(tmp_path) -> None:
    with pytest.raises(ValueError, match="perceptual_weights_path"):
        LPIPSWithDiscriminator(perceptual_weight=1.0)
    with pytest.raises(FileNotFoundError, match="perceptual_weights_path"):
        LPIPSWithDiscriminator(perceptual_weight=1.0, perceptual_weights_path=tmp_path / "missing.pth")
    lins_only = {k: v for k, v in LPIPS().state_dict().items() if k.startswith("lin")}
    torch.save(lins_only, tmp_path / "lins.pth")
    with pytest.raises(ValueError, match="net.slice"):
        LPIPS.from_file(tmp_path / "lins.pth")


def test_lpips_structure_matches_torchvision_vgg16(tmp_path) -> None:
    import torchvision as torchvision  # a dev dependency: missing means a broken install, not a skip
    torch.manual_seed(0)
    ours = LPIPS()
    with torch.device("meta"):
        vgg = torchvision.models.vgg16().features
    ref = {f"{i}.{n}": tuple(p.shape) for i, m in enumerate(vgg) if i < 30 for n, p in m.named_parameters()}
    got = {k.split(".", 2)[2]: tuple(v.shape) for k, v in ours.state_dict().items() if k.startswith("net.")}
    assert got == ref
    assert all(not p.requires_grad for p in ours.parameters())
    assert not ours.train().training  # a fixed metric: dropout stays off
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert ours(x, x).abs().max() < 1e-6 and ours(x, y).shape == (2, 1, 1, 1)
    torch.save({f"loss.perceptual_loss.{k}": v for k, v in ours.state_dict().items()}, tmp_path / "lpips.pth")
    loss = LPIPSWithDiscriminator(perceptual_weight=1.0, perceptual_weights_path=tmp_path / "lpips.pth")
    torch.testing.assert_close(loss.perceptual_loss(x, y), ours(x, y))
    torch.testing.assert_close(loss.reconstruction_loss(x, y), (x - y).abs() + ours(x, y))


def test_lpips_matches_the_lpips_package(tmp_path) -> None:
    import lpips as lpips  # test-only reference; its VGG is built without downloaded weights here
    torch.manual_seed(0)
    ref = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()  # ships its lin weights
    torch.save(ref.state_dict(), tmp_path / "lpips_ref.pth")
    ours = LPIPS.from_file(tmp_path / "lpips_ref.pth")
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(ours(x, y), ref(x, y), atol=1e-6, rtol=1e-5)
