"""Caption dropout for classifier-free guidance training (Ho & Salimans 2022; SD 2 ``ucg_training``: 10 % → "")."""
from __future__ import annotations

import torch


def drop_captions(captions: list[str], p: float, generator: torch.Generator | None = None) -> list[str]:
    """Replace each caption by the empty prompt "" independently with probability ``p``.

    Args:
        captions: B captions.
        p: drop probability in [0, 1].
        generator: a CPU generator for reproducible draws (one uniform number per caption).

    Returns:
        A new list of B captions.
    """
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"caption dropout p={p} must be in [0, 1]")
    captions = list(captions)
    if p == 0.0 or not captions:
        return captions
    u = torch.rand(len(captions), generator=generator)  # (B,) ~ U[0, 1)
    return ["" if drop else c for c, drop in zip(captions, (u < p).tolist())]
