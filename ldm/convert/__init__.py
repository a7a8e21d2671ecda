"""Conversion between our checkpoint layout (the original LDM / Stable Diffusion keys) and diffusers folders.

    from ldm.convert import export_diffusers, import_diffusers
    export_diffusers(ldm.load("v1-5.safetensors"), "sd15-diffusers")     # StableDiffusionPipeline.from_pretrained
    model = import_diffusers("sd15-diffusers")                            # back to ldm.model.LatentDiffusion

Key maps are generated from the architecture config (:mod:`.diffusers_unet`, :mod:`.diffusers_vae`,
:mod:`.diffusers_text`); the library never imports diffusers.
"""
from ldm.convert.diffusers_folder import config_from_diffusers, export_diffusers, import_diffusers
from ldm.convert.diffusers_unet import (unet_config_from_diffusers, unet_config_to_diffusers, unet_diffusers_to_ldm,
                                        unet_ldm_to_diffusers)
from ldm.convert.diffusers_vae import (vae_config_from_diffusers, vae_config_to_diffusers, vae_diffusers_to_ldm,
                                       vae_ldm_to_diffusers)

__all__ = ["config_from_diffusers", "export_diffusers", "import_diffusers", "unet_config_from_diffusers",
           "unet_config_to_diffusers", "unet_diffusers_to_ldm", "unet_ldm_to_diffusers", "vae_config_from_diffusers",
           "vae_config_to_diffusers", "vae_diffusers_to_ldm", "vae_ldm_to_diffusers"]
