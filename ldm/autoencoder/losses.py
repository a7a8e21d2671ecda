"""Training losses of the KL autoencoder (the SD recipe, math only: no Lightning).

Generator step (``optimizer_idx=0``), per image, with learned scalar log-variance s (``logvar``):

    L_rec = w_pix·|x − x̂|₁ + w_p·LPIPS(x, x̂)            (per pixel)
    L_nll = Σ_pixels (L_rec / e^s + s) / B
    L_G   = L_nll + w_kl·KL(q(z|x) ‖ N(0, I)) + λ·f(step)·(−mean D(x̂))
    λ     = w_d · clamp(‖∇_w L_nll‖ / (‖∇_w L_GAN‖ + 1e-4), 0, 1e4)    (w: the decoder's last conv; detached)

Discriminator step (``optimizer_idx=1``): f(step)·hinge (or vanilla) loss of the patch-GAN on x vs x̂, with
f(step) = 0 before ``disc_start`` (Esser et al. 2021, "Taming Transformers", eq. 7; Rombach et al. 2022, App. G).

Differences from the original ``ldm.modules.losses.LPIPSWithDiscriminator`` (kept name, compatible params):
- ``logvar`` is trained when ``learn_logvar=True`` (default): the original optimizer never included it, so it
  stayed at ``logvar_init``. Give :meth:`LPIPSWithDiscriminator.autoencoder_parameters` to the generator optimizer.
- ``perceptual_weight`` defaults to 0: LPIPS weights cannot be downloaded here. With ``perceptual_weight > 0``
  pass ``perceptual_weights_path``, a local LPIPS-VGG state dict (e.g. the ``loss.perceptual_loss.*`` keys of an SD
  autoencoder training checkpoint).
- ``pixelloss_weight`` actually scales the L1 term (the original stored it but never used it; default 1 = same).
- The discriminator is not run in the generator step before ``disc_start`` (its term has weight exactly 0).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldm.autoencoder.distributions import DiagonalGaussianDistribution
from ldm.checkpoint import read_state_dict

log = logging.getLogger(__name__)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """½·(mean ReLU(1 − D(x)) + mean ReLU(1 + D(x̂))), a scalar."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """½·(mean softplus(−D(x)) + mean softplus(D(x̂))): the non-saturating GAN loss, a scalar."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """``weight`` from step ``threshold`` on, ``value`` before it."""
    return value if global_step < threshold else weight


def adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    disc_weight: float = 1.0) -> torch.Tensor:
    """λ = disc_weight · clamp(‖∇_w nll‖ / (‖∇_w g‖ + 1e-4), 0, 1e4), detached; w = ``last_layer``."""
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    d_weight = torch.linalg.vector_norm(nll_grads) / (torch.linalg.vector_norm(g_grads) + 1e-4)
    return d_weight.clamp(0.0, 1e4).detach() * disc_weight


class NLayerDiscriminator(nn.Module):
    """The pix2pix / taming patch-GAN: 4×4 convs, LeakyReLU(0.2), BatchNorm; outputs (B, 1, h', w') logits."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_weights_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)  # (B, 1, h', w')


def _weights_init(m: nn.Module) -> None:
    """Conv weights ~ N(0, 0.02); BatchNorm γ ~ N(1, 0.02), β = 0 (DCGAN / pix2pix)."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class LPIPS(nn.Module):
    """LPIPS-VGG (Zhang et al. 2018): Σ_l mean_hw ‖w_l ⊙ (φ̂_l(x) − φ̂_l(y))‖², φ̂ = unit-normalized VGG16 features.

    Same module layout as taming's / the ``lpips`` package's (``scaling_layer``, ``net.slice{1..5}``,
    ``lin{0..4}.model.1``), so their state dicts load. Built without weights: use :meth:`from_file`. Frozen, and
    always in eval mode (the original let ``.train()`` switch on dropout in the ``lin`` layers of this fixed metric).
    """

    CHANNELS = (64, 128, 256, 512, 512)
    SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))  # VGG16 features up to relu1_2, 2_2, 3_3, 4_3, 5_3

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers  # noqa: PLC0415 (only needed with perceptual loss)

        self.scaling_layer = _ScalingLayer()
        features = make_layers(cfgs["D"])  # VGG16 "features", random init: weights come from a file
        self.net = nn.Module()
        for n, (a, b) in enumerate(self.SLICES, start=1):
            setattr(self.net, f"slice{n}", nn.Sequential(OrderedDict((str(i), features[i]) for i in range(a, b))))
        for n, c in enumerate(self.CHANNELS):
            setattr(self, f"lin{n}", _NetLinLayer(c))
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)

    @classmethod
    def from_file(cls, path: str | Path) -> "LPIPS":
        """Build and load a full LPIPS-VGG state dict (``.pt``/``.pth``/``.ckpt`` or ``.safetensors``).

        Keys may carry the ``loss.perceptual_loss.`` prefix of SD autoencoder training checkpoints.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"perceptual_weights_path {str(path)!r} does not exist")
        sd = read_state_dict(path)[0]  # Lightning's "state_dict" unwrapped
        model = cls()
        sd = {_strip(k): v for k, v in sd.items()}
        wanted = model.state_dict().keys()
        missing = [k for k in wanted if k not in sd and not k.startswith("scaling_layer.")]
        if missing:
            raise ValueError(f"perceptual_weights_path {str(path)!r} is not a full LPIPS-VGG state dict: "
                             f"{len(missing)} missing key(s), e.g. {missing[:3]} (need net.slice*, lin*)")
        model.load_state_dict({k: v for k, v in sd.items() if k in wanted}, strict=False)
        log.info("loaded LPIPS-VGG weights from %s", path)
        return model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y (B, 3, H, W) in [-1, 1] -> distance (B, 1, 1, 1)."""
        hx, hy = self.scaling_layer(x), self.scaling_layer(y)
        total = x.new_zeros(())
        for n in range(len(self.CHANNELS)):
            block = getattr(self.net, f"slice{n + 1}")
            hx, hy = block(hx), block(hy)  # (B, C_l, H_l, W_l)
            diff = (_unit(hx) - _unit(hy)).pow(2)
            total = total + getattr(self, f"lin{n}")(diff).mean(dim=(2, 3), keepdim=True)  # (B, 1, 1, 1)
        return total


class _ScalingLayer(nn.Module):
    """Maps [-1, 1] inputs to the ImageNet statistics VGG expects (constants of the lpips package)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class _NetLinLayer(nn.Module):
    """Dropout + 1×1 conv to one channel without bias (``lin{n}.model.1.weight``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _unit(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Normalize feature vectors to unit length along channels."""
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def _strip(key: str) -> str:
    for prefix in ("loss.perceptual_loss.", "perceptual_loss."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


class LPIPSWithDiscriminator(nn.Module):
    """L1 (+ LPIPS) reconstruction with learned log-variance, KL, and an adaptive-weight patch-GAN.

    Args (original names): disc_start (first step of the GAN terms), logvar_init, kl_weight, pixelloss_weight,
        disc_num_layers, disc_in_channels, disc_factor, disc_weight, perceptual_weight, use_actnorm (only False),
        disc_conditional (only False), disc_loss ("hinge" or "vanilla").
    Ours: learn_logvar (train ``logvar``), perceptual_weights_path (local LPIPS-VGG weights), disc_ndf (64).
    Defaults follow the SD KL-f8 recipe (REFERENCE.md), except perceptual_weight (see the module docstring).
    """

    def __init__(self, disc_start: int = 50001, logvar_init: float = 0.0, kl_weight: float = 1e-6,
                 pixelloss_weight: float = 1.0, disc_num_layers: int = 3, disc_in_channels: int = 3,
                 disc_factor: float = 1.0, disc_weight: float = 0.5, perceptual_weight: float = 0.0,
                 use_actnorm: bool = False, disc_conditional: bool = False, disc_loss: str = "hinge",
                 learn_logvar: bool = True, perceptual_weights_path: str | Path | None = None,
                 disc_ndf: int = 64) -> None:
        super().__init__()
        if disc_loss not in ("hinge", "vanilla"):
            raise ValueError(f"disc_loss must be 'hinge' or 'vanilla', got {disc_loss!r}")
        if use_actnorm or disc_conditional:
            raise ValueError("use_actnorm and disc_conditional are not supported (use BatchNorm, unconditional)")
        self.disc_start, self.kl_weight, self.pixel_weight = int(disc_start), float(kl_weight), float(pixelloss_weight)
        self.disc_factor, self.disc_weight = float(disc_factor), float(disc_weight)
        self.perceptual_weight, self.learn_logvar = float(perceptual_weight), bool(learn_logvar)
        self.logvar = nn.Parameter(torch.tensor(float(logvar_init)), requires_grad=self.learn_logvar)
        if self.perceptual_weight > 0:
            if perceptual_weights_path is None:
                raise ValueError("perceptual_weight > 0 needs perceptual_weights_path: a local LPIPS-VGG state dict "
                                 "(weights cannot be downloaded); or set perceptual_weight: 0")
            self.perceptual_loss = LPIPS.from_file(perceptual_weights_path)
        else:
            log.info("LPIPSWithDiscriminator: perceptual loss off (perceptual_weight=0; the original default was 1)")
        self.discriminator = NLayerDiscriminator(disc_in_channels, disc_ndf, disc_num_layers)
        self.disc_loss = hinge_d_loss if disc_loss == "hinge" else vanilla_d_loss

    def autoencoder_parameters(self) -> list[nn.Parameter]:
        """Parameters of the loss that the *generator* optimizer must train: ``[logvar]`` when learn_logvar."""
        return [self.logvar] if self.learn_logvar else []

    def discriminator_parameters(self) -> list[nn.Parameter]:
        """Parameters for the discriminator optimizer."""
        return list(self.discriminator.parameters())

    def reconstruction_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        """w_pix·|x − x̂| + w_p·LPIPS(x, x̂), per pixel: (B, C, H, W)."""
        rec = self.pixel_weight * (inputs - reconstructions).abs()
        if self.perceptual_weight > 0:
            rec = rec + self.perceptual_weight * self.perceptual_loss(inputs, reconstructions)  # (B,1,1,1) broadcast
        return rec

    def forward(self, inputs: torch.Tensor, reconstructions: torch.Tensor, posteriors: DiagonalGaussianDistribution,
                optimizer_idx: int, global_step: int, last_layer: torch.Tensor | None = None,
                split: str = "train") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Generator (``optimizer_idx=0``) or discriminator (``1``) loss and a log dict keyed ``{split}/...``.

        inputs, reconstructions: (B, C, H, W) in [-1, 1]; last_layer: the decoder's last conv weight (needed for
        the adaptive GAN weight while training once the discriminator is on).
        """
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.disc_start)
        if optimizer_idx == 0:
            return self._generator_loss(inputs, reconstructions, posteriors, disc_factor, last_layer, split)
        if optimizer_idx == 1:
            return self._discriminator_loss(inputs, reconstructions, disc_factor, split)
        raise ValueError(f"optimizer_idx must be 0 (generator) or 1 (discriminator), got {optimizer_idx!r}")

    def _generator_loss(self, x: torch.Tensor, x_rec: torch.Tensor, posteriors: DiagonalGaussianDistribution,
                        disc_factor: float, last_layer: torch.Tensor | None,
                        split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        B = x.shape[0]
        rec_loss = self.reconstruction_loss(x, x_rec)  # (B, C, H, W)
        nll_loss = torch.sum(rec_loss / torch.exp(self.logvar) + self.logvar) / B
        kl_loss = posteriors.kl().sum() / B
        zero = nll_loss.new_zeros(())
        g_loss, d_weight = zero, zero
        if disc_factor > 0:
            g_loss = -self.discriminator(x_rec).mean()
            d_weight = self._adaptive_weight(nll_loss, g_loss, last_layer)
        loss = nll_loss + self.kl_weight * kl_loss + d_weight * disc_factor * g_loss
        logs = {"total_loss": loss, "logvar": self.logvar, "kl_loss": kl_loss, "nll_loss": nll_loss,
                "rec_loss": rec_loss.mean(), "d_weight": d_weight, "disc_factor": torch.tensor(disc_factor),
                "g_loss": g_loss}
        return loss, {f"{split}/{k}": v.detach().clone() for k, v in logs.items()}

    def _adaptive_weight(self, nll_loss: torch.Tensor, g_loss: torch.Tensor,
                         last_layer: torch.Tensor | None) -> torch.Tensor:
        if torch.is_grad_enabled() and nll_loss.requires_grad and last_layer is not None:
            return adaptive_weight(nll_loss, g_loss, last_layer, self.disc_weight)
        if self.training:
            raise ValueError("the GAN term is on: pass last_layer=autoencoder.get_last_layer() with gradients enabled")
        return nll_loss.new_zeros(())  # validation without gradients: as the original, λ = 0

    def _discriminator_loss(self, x: torch.Tensor, x_rec: torch.Tensor, disc_factor: float,
                            split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits_real = self.discriminator(x.detach())  # (B, 1, h', w')
        logits_fake = self.discriminator(x_rec.detach())
        d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)
        logs = {"disc_loss": d_loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        return d_loss, {f"{split}/{k}": v.detach().clone() for k, v in logs.items()}
