"""Prompt emphasis, the AUTOMATIC1111 web UI's syntax: ``(text)``, ``(text:w)``, ``[text]``, ``BREAK``.

The grammar (``parse_emphasis``):

- ``(text)`` multiplies the weight of ``text``'s tokens by 1.1, ``[text]`` by 1/1.1; brackets nest and multiply;
- ``(text:w)`` multiplies it by w (any decimal number, also below 1 or negative);
- ``\\(``, ``\\)``, ``\\[``, ``\\]``, ``\\\\`` are the characters themselves;
- a bracket left open applies up to the end of the prompt; a closing one without its opening bracket is text;
- ``BREAK`` (in capitals, as a word) ends the current 75-token chunk: what follows starts a new one.

Weights act on the text encoder's output (``apply_emphasis``): each token's hidden state z_i (D) is multiplied by its
weight w_i (1 for the start, end and padding tokens), then, in the web UI's "original" mode, the whole is rescaled
so that its mean over tokens and features is the unweighted one's: z' = (z ⊙ w) · mean(z) / mean(z ⊙ w); "no_norm"
skips the rescale. The mean is taken per prompt and per chunk (the web UI takes it over the batch of a chunk, so an
image changed with the other prompts of its batch; for one prompt both are the same). A trained encoder's final
LayerNorm (its bias) keeps that mean away from 0; a weighted mean of exactly 0 is left unscaled.
"""
from __future__ import annotations

import re

import torch

EMPHASIS_MODES = ("original", "no_norm")
ROUND, SQUARE = 1.1, 1 / 1.1  # the multipliers of () and []

# one token of the grammar: an escape, a bracket, ":w)" (group 1: w), text without brackets, or a lone ":"
_TOKEN = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|]|
[^\\()\[\]:]+|
:
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_emphasis(text: str) -> list[tuple[str, float | None]]:
    """``text`` -> its runs of (text, weight), neighbours of equal weight merged; ``("BREAK", None)`` marks a chunk
    break. An empty prompt is ``[("", 1.0)]``."""
    res: list[list] = []
    round_open: list[int] = []  # where in ``res`` each open bracket began
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for item in res[start:]:
            if item[1] is not None:
                item[1] *= factor

    for m in _TOKEN.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\"):
            res.append([tok[1:], 1.0])
        elif tok == "(":
            round_open.append(len(res))
        elif tok == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            multiply(round_open.pop(), _number(weight, text))
        elif tok == ")" and round_open:
            multiply(round_open.pop(), ROUND)
        elif tok == "]" and square_open:
            multiply(square_open.pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(tok)):
                if i:
                    res.append(["BREAK", None])
                res.append([part, 1.0])
    for start in round_open:
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, SQUARE)
    return _merged(res) or [("", 1.0)]


def _number(weight: str, text: str) -> float:
    try:
        return float(weight)
    except ValueError:  # the grammar's number is [+-]?[.\d]+, which also matches "1.2.3" or "."
        raise ValueError(f"prompt emphasis: {weight!r} is not a weight (a number such as 1.2) in {text!r}") from None


def _merged(res: list[list]) -> list[tuple[str, float | None]]:
    """Neighbouring runs of the same weight as one run (breaks stay apart)."""
    out: list[list] = []
    for text, weight in res:
        if out and weight is not None and out[-1][1] == weight:
            out[-1][0] += text
        else:
            out.append([text, weight])
    return [(t, w) for t, w in out]


def apply_emphasis(z: torch.Tensor, weights: torch.Tensor, mode: str = "original") -> torch.Tensor:
    """Hidden states z (B, L, D) of one chunk and their tokens' weights (B, L) -> z weighted (module docstring), in
    z's dtype; the products and means are computed in float32."""
    check_mode(mode)
    z32 = z.float()
    zw = z32 * weights.to(z32)[..., None]  # (B, L, D)
    if mode == "original":
        old, new = z32.mean(dim=(1, 2), keepdim=True), zw.mean(dim=(1, 2), keepdim=True)  # (B, 1, 1)
        zw = zw * torch.where(new != 0, old / new, torch.ones_like(new))  # a mean of exactly 0 stays (no 0/0)
    return zw.to(z.dtype)


def check_mode(mode: str | None) -> None:
    """Refuse an emphasis mode other than None (no emphasis) and :data:`EMPHASIS_MODES`."""
    if mode is not None and mode not in EMPHASIS_MODES:
        raise ValueError(f"emphasis={mode!r}: use None (prompts read literally) or one of {EMPHASIS_MODES}")
