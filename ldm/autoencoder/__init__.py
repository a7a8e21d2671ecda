"""Stage 1: the KL autoencoder (model, posterior distribution, training losses)."""
from ldm.autoencoder.distributions import DiagonalGaussianDistribution
from ldm.autoencoder.losses import (LPIPS, LPIPSWithDiscriminator, NLayerDiscriminator, adaptive_weight, adopt_weight,
                                    hinge_d_loss, vanilla_d_loss)
from ldm.autoencoder.model import AttnBlock, AutoencoderKL, Decoder, Downsample, Encoder, ResnetBlock, Upsample

__all__ = [
    "LPIPS", "AttnBlock", "AutoencoderKL", "Decoder", "DiagonalGaussianDistribution", "Downsample", "Encoder",
    "LPIPSWithDiscriminator", "NLayerDiscriminator", "ResnetBlock", "Upsample", "adaptive_weight", "adopt_weight",
    "hinge_d_loss", "vanilla_d_loss",
]
