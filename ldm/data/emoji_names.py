"""Emoji icon names → captions, base concepts and splits.

Name patterns (checked against ``@iconify-json/noto@1.2.9`` and ``@iconify-json/fluent-emoji@1.2.7``):

- Noto spells tones out: ``woman-pilot-medium-dark-skin-tone``; two-person emoji carry two tones
  (``kiss-man-man-dark-skin-tone-light-skin-tone``); 31 hidden legacy icons end in ``-tone1`` … ``-tone5``
  (Fitzpatrick order: light, medium-light, medium, medium-dark, dark); the swatches are named ``medium-skin-tone``.
- Fluent appends the bare tone: ``woman-pilot-medium-dark``. A suffix is a tone only when the same base has other
  tone variants: ``horizontal-traffic-light`` and ``police-car-light`` end in ``-light`` but are objects.

Every name is first normalised to Noto's spelling (the *slug*); the caption is the slug's words with tone names kept
hyphenated ("woman pilot medium-dark skin tone, flat emoji"); the concept is the slug without its tone phrases.
A naive rule (append "skin tone" to every Fluent name ending in light/dark/medium, and split "medium-dark" into two
words) finds 4,596 distinct captions without the style; the rules here find 4,004 (see tests/test_data_emoji.py).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

TONES = ("light", "medium-light", "medium", "medium-dark", "dark")  # Fitzpatrick 1-2, 3, 4, 5, 6
STYLE_WORDS = {"noto": "flat emoji", "fluent": "fluent emoji"}
SPLITS = ("train", "heldout", "style_transfer_eval")
HELDOUT_FILE = Path(__file__).with_name("emoji_heldout.txt")
STYLE_TRANSFER_FILE = Path(__file__).with_name("emoji_style_transfer.txt")
_FLUENT_TONE = re.compile(r"^(?P<base>.+?)-(?P<tone>medium-light|medium-dark|light|medium|dark)$")
_NOTO_LEGACY = re.compile(r"^(?P<base>.+)-tone(?P<n>[1-5])$")


def fluent_tone_bases(names: Iterable[str]) -> set[str]:
    """Bases that carry a skin tone in Fluent: those with at least two names ``base-<tone>``."""
    bases = Counter(m["base"] for m in map(_FLUENT_TONE.match, names) if m)
    return {b for b, n in bases.items() if n >= 2}


def to_slug(name: str, style: str, tone_bases: set[str] | None = None) -> str:
    """Icon name → Noto-spelled slug (``…-medium-dark-skin-tone``). Fluent needs ``tone_bases`` from
    :func:`fluent_tone_bases` over all Fluent names."""
    if style == "fluent":
        m = _FLUENT_TONE.match(name)
        if m and tone_bases is not None and m["base"] in tone_bases:
            return f"{m['base']}-{m['tone']}-skin-tone"
        return name
    if style != "noto":
        raise ValueError(f"emoji style must be 'noto' or 'fluent', got {style!r}")
    m = _NOTO_LEGACY.match(name)
    return f"{m['base']}-{TONES[int(m['n']) - 1]}-skin-tone" if m else name


def _words(slug: str) -> list[str]:
    """Slug → words, with "medium" + "light"/"dark" joined when they name a skin tone."""
    parts, out, i = slug.split("-"), [], 0
    while i < len(parts):
        if parts[i] == "medium" and parts[i + 1:i + 2] in (["light"], ["dark"]) and parts[i + 2:i + 3] == ["skin"]:
            out.append(f"medium-{parts[i + 1]}")
            i += 2
        else:
            out.append(parts[i])
            i += 1
    return out


def caption_text(slug: str) -> str:
    """Slug → caption without the style: "woman pilot medium-dark skin tone"."""
    return " ".join(_words(slug))


def caption(slug: str, style: str) -> str:
    """Slug → full caption: "woman pilot medium-dark skin tone, flat emoji" / "…, fluent emoji"."""
    return f"{caption_text(slug)}, {STYLE_WORDS[style]}"


def concept(slug: str) -> str:
    """Slug → base concept: every "<tone> skin tone" phrase removed (a bare swatch keeps its name)."""
    words, out, i = _words(slug), [], 0
    while i < len(words):
        if words[i] in TONES and words[i + 1:i + 3] == ["skin", "tone"]:
            i += 3
        else:
            out.append(words[i])
            i += 1
    return "-".join(out) if out else slug


def _rank(items: Iterable[str], salt: str) -> list[str]:
    return sorted(items, key=lambda c: hashlib.sha256(f"{salt}:{c}".encode()).hexdigest())


def choose_heldout(concepts: Iterable[str], fraction: float = 0.1, salt: str = "ldm-emoji-heldout-v1") -> list[str]:
    """Deterministic held-out concepts: the first ``fraction`` of concepts ranked by sha256(salt:concept)."""
    concepts = sorted(set(concepts))
    return sorted(_rank(concepts, salt)[:round(fraction * len(concepts))])


def choose_style_transfer(concepts_by_style: dict[str, set[str]], heldout: Iterable[str], fraction: float = 0.05,
                          salt: str = "ldm-emoji-style-v1") -> dict[str, str]:
    """Concepts drawn in both styles (and not held out) that train in only one style: {concept: train style}.
    ``fraction`` is of all concepts; the trained style alternates in hash order (half noto, half fluent)."""
    both = set.intersection(*concepts_by_style.values()) - set(heldout)
    n = round(fraction * len(set.union(*concepts_by_style.values())))
    styles = sorted(concepts_by_style)
    return {c: styles[i % len(styles)] for i, c in enumerate(_rank(both, salt)[:n])}


def load_heldout(path: str | Path = HELDOUT_FILE) -> set[str]:
    """The committed held-out concept list (one per line, ``#`` comments)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return {ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")}


def load_style_transfer(path: str | Path = STYLE_TRANSFER_FILE) -> dict[str, str]:
    """The committed style-transfer list: ``concept<TAB>trained style`` per line."""
    out = {}
    for ln in Path(path).read_text(encoding="utf-8").splitlines():
        if ln.strip() and not ln.startswith("#"):
            c, style = ln.split("\t")
            out[c.strip()] = style.strip()
    return out


def assign_split(concept_name: str, style: str, heldout: set[str], style_transfer: dict[str, str]) -> str:
    """``heldout`` for held-out concepts (every style and tone); ``style_transfer_eval`` for a style-transfer
    concept in its untrained style; ``train`` otherwise (including concepts unknown to the committed lists)."""
    if concept_name in heldout:
        return "heldout"
    if concept_name in style_transfer and style_transfer[concept_name] != style:
        return "style_transfer_eval"
    return "train"


def write_split_files(concepts_by_style: dict[str, set[str]], heldout_path: str | Path = HELDOUT_FILE,
                      style_path: str | Path = STYLE_TRANSFER_FILE) -> None:
    """(Re)generate the committed lists. Only for maintainers: the lists are committed so the split never drifts."""
    all_concepts = set.union(*concepts_by_style.values())
    heldout = choose_heldout(all_concepts)
    st = choose_style_transfer(concepts_by_style, heldout)
    Path(heldout_path).write_text(
        f"# Held-out emoji concepts ({len(heldout)} of {len(all_concepts)}): every style and skin tone of these\n"
        "# stays out of training. Generated once by ldm.data.emoji_names.choose_heldout; committed, never regenerate.\n"
        + "".join(f"{c}\n" for c in heldout), encoding="utf-8")
    Path(style_path).write_text(
        f"# Style-transfer emoji concepts ({len(st)}): trained only in the listed style, evaluated in the other.\n"
        "# Generated once by ldm.data.emoji_names.choose_style_transfer; committed, never regenerate.\n"
        + "".join(f"{c}\t{s}\n" for c, s in sorted(st.items())), encoding="utf-8")
