"""Sample grids: images in rows, optional captions underneath each."""
from __future__ import annotations

import math
import textwrap
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont


def make_grid(images: Sequence[Image.Image], ncols: int | None = None, captions: Sequence[str] | None = None,
              pad: int = 2, caption_chars: int = 18) -> Image.Image:
    """Tile equally sized PIL images into one picture; captions (wrapped) go under their image."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    w, h = images[0].size
    ncols = ncols or math.ceil(math.sqrt(len(images)))
    nrows = math.ceil(len(images) / ncols)
    font = ImageFont.load_default()
    lines = [textwrap.wrap(c, caption_chars)[:3] for c in captions] if captions else None
    text_h = (11 * max((len(x) for x in lines), default=0) + 4) if lines else 0
    grid = Image.new("RGB", (ncols * (w + pad) + pad, nrows * (h + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        r, c = divmod(i, ncols)
        x, y = pad + c * (w + pad), pad + r * (h + text_h + pad)
        grid.paste(im.convert("RGB"), (x, y))
        if lines:
            for j, line in enumerate(lines[i]):
                draw.text((x + 1, y + h + 2 + 11 * j), line, fill="black", font=font)
    return grid
