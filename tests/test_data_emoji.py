"""The emoji dataset: caption rules, split determinism, the renderer, the committed fixture, package checks."""

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import resvg_py
from PIL import Image

from ldm.data import ShardDataset
from ldm.data import emoji_names as N
from ldm.data.emoji import PACKAGES, default_cache, fetch, icon_svg, render_icon, safe_extract
from ldm.data.emoji_build import build_emoji_dataset, count_table, make_records

FIX = Path(__file__).parent / "fixtures" / "emoji"


def name_sets() -> dict:
    """Icon sets with every real name (bodies are not needed for names, captions and splits)."""
    return {style: {"icons": {n: {"body": ""} for n in (FIX / f"names_{style}.txt").read_text().split()}}
            for style in ("noto", "fluent")}


@pytest.mark.parametrize("name,style,want", [
    ("woman-pilot-medium-dark", "fluent", "woman pilot medium-dark skin tone, fluent emoji"),
    ("woman-pilot-medium-dark-skin-tone", "noto", "woman pilot medium-dark skin tone, flat emoji"),
    ("artist-light", "fluent", "artist light skin tone, fluent emoji"),
    ("horizontal-traffic-light", "fluent", "horizontal traffic light, fluent emoji"),
    ("police-car-light", "fluent", "police car light, fluent emoji"),
    ("black-medium-square", "fluent", "black medium square, fluent emoji"),
    ("mermaid-tone4", "noto", "mermaid medium-dark skin tone, flat emoji"),
    ("medium-light-skin-tone", "noto", "medium-light skin tone, flat emoji"),
    ("kiss-man-man-dark-skin-tone-medium-light-skin-tone", "noto",
     "kiss man man dark skin tone medium-light skin tone, flat emoji"),
])
def test_caption_rules(name, style, want):
    tone_bases = N.fluent_tone_bases(name_sets()["fluent"]["icons"])
    assert N.caption(N.to_slug(name, style, tone_bases), style) == want


def test_concepts():
    assert N.concept("woman-pilot-medium-dark-skin-tone") == "woman-pilot"
    assert N.concept("kiss-man-man-dark-skin-tone-medium-light-skin-tone") == "kiss-man-man"
    assert N.concept("medium-dark-skin-tone") == "medium-dark-skin-tone"  # a swatch is its own concept
    assert N.concept("black-medium-square") == "black-medium-square"


def test_counts_from_all_names():
    records = make_records(name_sets())
    c = count_table(records)
    assert c["by_style"] == {"noto": 3819, "fluent": 3174} and c["total"] == 6993
    assert c["unique_captions_without_style"] == 4004 and c["concepts"] == 1776
    assert c["by_split"] == {"train": {"noto": 3256, "fluent": 2746}, "heldout": {"noto": 483, "fluent": 339},
                             "style_transfer_eval": {"noto": 80, "fluent": 89}}
    # The 4,596 comes from a naive rule: every Fluent name ending in a tone gets "skin tone" (traffic
    # lights included) with the tone kept hyphenated, while Noto's "medium-dark" is split into two words.
    def naive(name, style):
        m = re.match(r"(.+?)-(medium-light|medium-dark|light|medium|dark)$", name)
        if style == "fluent" and m:
            return f"{m[1].replace('-', ' ')} {m[2]} skin tone"
        return name.replace("-", " ")
    assert len({naive(r.name, r.style) for r in records}) == 4596


def test_categories_come_from_noto_and_carry_over_to_fluent_by_concept():
    cats = {"noto": {"grinning-face": "Smileys & Emotion", "woman-pilot-medium-dark-skin-tone": "People & Body"},
            "fluent": {}}
    records = {(r.style, r.name): r for r in make_records(name_sets(), categories=cats)}
    assert records["noto", "grinning-face"].category == "Smileys & Emotion"
    assert records["fluent", "grinning-face"].category == "Smileys & Emotion"  # same concept, no Fluent metadata
    assert records["fluent", "woman-pilot-medium-dark"].category == "People & Body"
    assert records["fluent", "woman-pilot"].category == "People & Body"  # the concept drops the tone
    assert records["noto", "red-heart"].category == "Other"


def test_splits_are_committed_and_consistent():
    records = make_records(name_sets())
    by_style = {s: {r.concept for r in records if r.style == s} for s in ("noto", "fluent")}
    heldout, st = N.load_heldout(), N.load_style_transfer()
    assert set(N.choose_heldout(set.union(*by_style.values()))) == heldout  # regenerates to the committed list
    assert N.choose_style_transfer(by_style, heldout) == st
    assert len(heldout) == round(0.1 * 1776) and not set(st) & heldout
    for r in records:
        if r.concept in heldout:
            assert r.split == "heldout"
        elif r.concept in st:
            assert r.split == ("train" if r.style == st[r.concept] else "style_transfer_eval")
    train = {r.concept for r in records if r.split == "train"}
    assert not train & heldout
    assert {st[r.concept] for r in records if r.split == "train" and r.concept in st} == {"noto", "fluent"}


def fixture_icons(style):
    data = json.loads((FIX / f"icons_{style}.json").read_text())
    return data, {k: data[k] for k in ("width", "height", "left", "top") if k in data}


def fixture_pngs() -> dict:
    with tarfile.open(FIX / "emoji32-000000.tar") as tar:
        return {m.name[:-4]: tar.extractfile(m).read() for m in tar if m.name.endswith(".png")}


@pytest.mark.parametrize("style", ["noto", "fluent"])
def test_renderer_matches_fixture_and_reference(style):
    data, defaults = fixture_icons(style)
    pngs = fixture_pngs()
    for name, icon in data["icons"].items():
        im = render_icon(icon, defaults, 32)
        arr = np.asarray(im, np.float64)
        assert im.size == (32, 32) and im.mode == "RGB"
        assert (arr[0, 0] == 255).all() and (arr[-1, -1] == 255).all()  # composited on white
        assert (arr.min(-1) < 250).mean() > 0.05, name  # something was drawn
        golden = np.asarray(Image.open(io.BytesIO(pngs[f"{style}_{name}"])).convert("RGB"), np.float64)
        assert np.abs(arr - golden).max() <= 8, name
        svg, w, h = icon_svg(icon, defaults)
        if w != h:
            continue  # non-square: test_non_square_icon_is_padded
        # Independent path: resvg at 4x with resvg's own white background, box-downsampled.
        big = Image.open(io.BytesIO(bytes(resvg_py.svg_to_bytes(svg_string=svg, width=128, height=128,
                                                                background="white"))))
        ref = np.asarray(big.convert("RGB").resize((32, 32), Image.BOX), np.float64)
        assert np.abs(arr - ref).mean() < 3.0, name


def test_non_square_icon_is_padded():
    data, defaults = fixture_icons("fluent")
    icon = data["icons"]["bomb"]
    assert icon.get("width", 32) != icon.get("height", 32)
    _, w, h = icon_svg(icon, defaults)
    assert f'viewBox="0 0 {icon.get("width", 32)} {icon.get("height", 32)}"' in icon_svg(icon, defaults)[0]
    assert 'xmlns:xlink="http://www.w3.org/1999/xlink"' in icon_svg(icon, defaults)[0]
    noto, noto_defaults = fixture_icons("noto")
    assert 'viewBox="0 0 128 128"' in icon_svg(noto["icons"]["red-heart"], noto_defaults)[0]  # file-level default
    arr = np.asarray(render_icon(icon, defaults, 64))
    pad = (arr == 255).all(-1).all(0) if h > w else (arr == 255).all(-1).all(1)
    assert pad[0] and pad[-1]


def test_fixture_shard_reads_clean():
    ds = ShardDataset(str(FIX / "emoji32-000000.tar"))
    samples = list(ds)
    assert len(samples) == 240 and ds.stats.kept == 240 and not ds.stats.skipped
    tone_bases = N.fluent_tone_bases(name_sets()["fluent"]["icons"])
    for s in samples:
        meta = s["meta"]
        assert s["image"].shape == (3, 32, 32) and s["key"] == f"{meta['style']}_{meta['name']}"
        assert s["caption"] == N.caption(N.to_slug(meta["name"], meta["style"], tone_bases), meta["style"])
    assert {s["meta"]["style"] for s in samples} == {"noto", "fluent"}
    assert (FIX / "LICENSE-noto-Apache-2.0.txt").exists() and (FIX / "LICENSE-fluent-emoji-MIT.txt").exists()


def test_sha256_mismatch_names_file_and_hashes(tmp_path):
    pkg = PACKAGES[0]
    (tmp_path / pkg.tarball).write_bytes(b"not the package")
    with pytest.raises(ValueError, match=rf"{pkg.tarball}.*expected {pkg.sha256}, got [0-9a-f]{{64}}"):
        fetch(pkg, tmp_path)


def test_safe_extract(tmp_path):
    for bad in ("../escape.txt", "/abs.txt"):
        tgz = tmp_path / "bad.tgz"
        with tarfile.open(tgz, "w:gz") as tar:
            info = tarfile.TarInfo(bad)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
        with pytest.raises(ValueError, match="escape"):
            safe_extract(tgz, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()
    with tarfile.open(tmp_path / "ok.tgz", "w:gz") as tar:
        info = tarfile.TarInfo("package/icons.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    assert safe_extract(tmp_path / "ok.tgz", tmp_path / "out") == ["package/icons.json"]


@pytest.mark.slow
@pytest.mark.skipif(not all((default_cache() / p.tarball).exists() for p in PACKAGES),
                    reason="npm tarballs not in ~/.cache/ldm/npm (python scripts/prepare_data.py fetches them)")
def test_build_full_dataset(tmp_path):
    man = build_emoji_dataset(tmp_path / "emoji32", 32, workers=2)
    assert man["counts"]["total"] == 6993 and sum(s["count"] for s in man["splits"].values()) == 6993
    assert build_emoji_dataset(tmp_path / "emoji32", 32)["seconds"] == man["seconds"]  # no-op second run
    for split in ("train", "heldout", "style_transfer_eval"):
        ds = ShardDataset(str(tmp_path / "emoji32"), split=split)
        assert sum(1 for _ in ds) == man["splits"][split]["count"] and not ds.stats.skipped


class _InProcessPool:
    """ProcessPoolExecutor's part that build_emoji_dataset uses, in this process (so a patched renderer applies)."""

    def __init__(self, max_workers=None):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def map(self, fn, jobs, chunksize=1):
        return map(fn, jobs)


def test_an_interrupted_rebuild_leaves_the_previous_dataset_whole(tmp_path, monkeypatch):
    """prepare_data.py emoji --force (or another --size) stopped midway: the previous shards and manifest stay as
    they were and nothing half-built is left; before, the old shards were deleted first, the new ones written in
    their place (a .partial file left) and the old manifest kept, listing shards of the new, unfinished build."""
    from ldm.data import emoji_build

    fixture_sets = {s: json.loads((FIX / f"icons_{s}.json").read_text()) for s in ("noto", "fluent")}
    monkeypatch.setattr(emoji_build, "load_icons", lambda p, cache=None: fixture_sets[p.style])
    monkeypatch.setattr(emoji_build, "load_categories", lambda p, cache=None: {})
    monkeypatch.setattr(emoji_build, "ProcessPoolExecutor", _InProcessPool)
    out = tmp_path / "emoji"
    man = build_emoji_dataset(out, 32, max_count=2)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "manifest.json" in before and len(before) == 1 + sum(len(s["shards"]) for s in man["splits"].values())
    real, calls = emoji_build._render_png, []

    def interrupted(job):
        calls.append(job)
        if len(calls) == 9:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(emoji_build, "_render_png", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_emoji_dataset(out, 32, max_count=2, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.setattr(emoji_build, "_render_png", real)
    again = build_emoji_dataset(out, 32, max_count=2, force=True)  # and a finished rebuild replaces it whole
    assert {k: v["shards"] for k, v in again["splits"].items()} == {k: v["shards"] for k, v in man["splits"].items()}
    assert sorted(p.name for p in out.iterdir()) == sorted(before)
    assert sum(1 for _ in ShardDataset(str(out), split="train")) == man["splits"]["train"]["count"]


@pytest.mark.parametrize("args, words", [
    (["--out", "{file}"], ["--out", "exists and is not a folder"]),
    (["--out", "{file}/sub"], ["--out", "is a file"]),
    (["--out", "{tmp}/o", "--cache", "{file}"], ["--cache", "not a folder"]),
    (["--out", "{tmp}/o", "--max-count", "0"], ["--max-count 0", "positive"]),
    (["--out", "{tmp}/o", "--workers", "-1"], ["--workers -1", "positive"]),
])
def test_prepare_data_bad_arguments_are_one_line(tmp_path, capsys, args, words):
    """Were tracebacks (NotADirectoryError, ZeroDivisionError, ProcessPoolExecutor's ValueError) after the
    packages were loaded."""
    from script_loader import load_script

    (tmp_path / "afile").write_text("x")
    fill = {"file": str(tmp_path / "afile"), "tmp": str(tmp_path)}
    with pytest.raises(SystemExit) as e:
        load_script("prepare_data").main(["emoji", *[a.format(**fill) for a in args]])
    err = capsys.readouterr().err
    assert e.value.code == 2 and all(w in err for w in words) and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_prepare_data_npm_failure_is_one_line(tmp_path, capsys, monkeypatch):
    import subprocess

    from ldm.data import emoji_build
    from script_loader import load_script

    def offline(pkg, cache=None):
        raise subprocess.CalledProcessError(1, ["npm", "pack", f"{pkg.name}@{pkg.version}", "--silent"])

    monkeypatch.setattr(emoji_build, "load_icons", offline)
    assert load_script("prepare_data").main(["emoji", "--out", str(tmp_path / "o"), "--cache", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "npm pack @iconify-json/" in err and "failed (exit status 1)" in err and "--cache" in err
