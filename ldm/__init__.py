"""ldm: latent diffusion, readable and fast.

    import ldm
    model = ldm.load("v1-5-pruned-emaonly.safetensors")
    images = model.generate(["a photograph of an astronaut riding a horse"], seed=0)
"""
from __future__ import annotations

import logging
from typing import Any

__version__ = "0.1.0"
logging.getLogger(__name__).addHandler(logging.NullHandler())


def load(*args: Any, **kwargs: Any) -> Any:
    """See :func:`ldm.loading.load`."""
    from ldm.loading import load as _load  # noqa: PLC0415

    return _load(*args, **kwargs)


def save(*args: Any, **kwargs: Any) -> Any:
    """See :func:`ldm.loading.save`."""
    from ldm.loading import save as _save  # noqa: PLC0415

    return _save(*args, **kwargs)
