"""The latent-diffusion U-Net (state-dict compatible with the original LDM / Stable Diffusion ``UNetModel``)."""
from ldm.unet.model import UNetModel, count_params

__all__ = ["UNetModel", "count_params"]
