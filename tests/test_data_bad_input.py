"""A shard set with known bad members: the reader skips exactly those, counts them by reason, keeps the rest."""

import io
import os
import pickle
import struct
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from ldm.data import ShardDataset
from ldm.data.validate import SkipStats, check_member_name, decode_image


def png(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def good_png(i: int) -> bytes:
    return png(Image.new("RGB", (16, 16), (i * 20 % 256, 100, 50)))


def huge_header_png(side: int = 50000) -> bytes:
    """A valid PNG header claiming side×side pixels with a tiny IDAT: a decompression bomb if ever decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


class Evil:
    """Unpickling this would create a file: the reader must never unpickle."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_bad_shards(tmp_path, canary):
    """Returns (shard paths, expected kept, expected skipped, expected converted)."""
    cmyk = io.BytesIO()
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(cmyk, format="JPEG", quality=95)
    i16 = png(Image.fromarray(np.full((16, 16), 32896, np.uint16)))  # 16-bit grey, 32896/257 = 128
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    pal.info["transparency"] = 0  # index 0 (red) transparent → white after compositing
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    shard = tmp_path / "data-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(10):  # 10 good samples
            add(tar, f"good{i}.png", good_png(i))
            add(tar, f"good{i}.txt", f"a good caption {i}".encode())
        noisy = png(Image.effect_noise((32, 32), 60).convert("RGB"))
        add(tar, "trunc.png", noisy[:len(noisy) // 2]), add(tar, "trunc.txt", b"truncated")
        add(tar, "text.png", b"this is not an image"), add(tar, "text.txt", b"not an image")
        add(tar, "cmyk.jpg", cmyk.getvalue()), add(tar, "cmyk.txt", b"cmyk")
        add(tar, "deep.png", i16), add(tar, "deep.txt", b"16 bit")
        add(tar, "pal.png", png(pal, transparency=0)), add(tar, "pal.txt", b"palette with transparency")
        add(tar, "rgba.png", png(rgba)), add(tar, "rgba.txt", b"transparent")
        add(tar, "tiny.png", png(Image.new("RGB", (1, 1)))), add(tar, "tiny.txt", b"one pixel")
        add(tar, "bomb.png", huge_header_png()), add(tar, "bomb.txt", b"bomb")
        add(tar, "nocap.png", good_png(3))
        add(tar, "emptycap.png", good_png(4)), add(tar, "emptycap.txt", b"  \n ")
        add(tar, "latin1.png", good_png(5)), add(tar, "latin1.txt", "caf\xe9".encode("latin-1"))
        add(tar, "/abs/evil.png", good_png(6)), add(tar, "/abs/evil.txt", b"absolute")
        add(tar, "../escape.png", good_png(7)), add(tar, "../escape.txt", b"dotdot")
        add(tar, "pick.png", good_png(8)), add(tar, "pick.txt", b"has a pickle")
        add(tar, "pick.pyd", pickle.dumps(Evil(canary)))
        add(tar, "onlypickle.pickle", pickle.dumps(Evil(canary)))
        add(tar, "onlytext.txt", b"no image here")
        add(tar, "badjson.png", good_png(9)), add(tar, "badjson.txt", b"x"), add(tar, "badjson.json", b"{not json")
        link = tarfile.TarInfo("link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    empty = tmp_path / "data-000001.tar"
    with tarfile.open(empty, "w"):
        pass
    cut = tmp_path / "data-000002.tar"
    with tarfile.open(tmp_path / "full.tar", "w") as tar:
        for i in range(3):
            add(tar, f"cut{i}.png", png(Image.effect_noise((64, 64), 50).convert("RGB")))
            add(tar, f"cut{i}.txt", b"in the cut shard")
    data = (tmp_path / "full.tar").read_bytes()
    cut.write_bytes(data[:len(data) * 3 // 4])  # the stream ends inside sample 2 or 3
    kept = 10 + 4 + 1  # good, cmyk/16-bit/palette/rgba converted, the sample with an ignored .pyd
    skipped = {"truncated_image": 1, "not_an_image": 1, "too_small": 1, "too_large": 1, "missing_caption": 1,
               "empty_caption": 1, "bad_caption_encoding": 1, "unsafe_member": 5, "ignored_extension": 2,
               "missing_image": 1, "bad_metadata": 1, "empty_shard": 1, "corrupt_shard": 1}
    converted = {"cmyk": 1, "16bit": 1, "palette": 1, "alpha": 2}
    return [shard, empty, cut], kept, skipped, converted


def test_bad_shard_set_counts_exact(tmp_path, caplog):
    canary = str(tmp_path / "unpickled")
    shards, kept, skipped, converted = make_bad_shards(tmp_path, canary)
    ds = ShardDataset([str(s) for s in shards], size=16, resize="center-crop")
    with caplog.at_level("WARNING"):
        samples = list(ds)
    cut_kept = sum(s["key"].startswith("cut") for s in samples)
    assert 1 <= cut_kept <= 2  # samples before the break are kept
    assert ds.stats.kept == len(samples) == kept + cut_kept
    assert dict(ds.stats.skipped) == skipped
    assert dict(ds.stats.converted) == converted
    assert not os.path.exists(canary), "a pickle was loaded"
    keys = {s["key"] for s in samples}
    assert {"cmyk", "deep", "pal", "rgba", "pick"} <= keys and not keys & {"trunc", "tiny", "bomb", "nocap"}
    assert "kept" in caplog.text and "empty_shard" in caplog.text
    # the report names where (the first 3 of each reason), not only how many: a user can find the bad files
    assert f"empty_shard: {shards[1]}" in caplog.text
    assert all(1 <= len(ds.stats.examples[r]) <= min(3, n) for r, n in skipped.items() if r != "empty_shard")
    by = {s["key"]: s["image"] for s in samples}
    assert all(s["image"].shape == (3, 16, 16) for s in samples)
    assert by["deep"].sub(128 / 127.5 - 1).abs().max() < 1e-6  # 16-bit scaled, not clipped to 255
    assert by["rgba"].min() == 1.0 and by["pal"].min() == 1.0  # transparent → white
    red = (by["cmyk"][:, 8, 8] + 1) * 127.5
    assert red[0] > 200 and red[1] < 60 and red[2] < 60


def test_caption_policy_empty_keeps(tmp_path):
    shards, kept, skipped, _ = make_bad_shards(tmp_path, str(tmp_path / "c"))
    ds = ShardDataset([str(shards[0])], size=16, caption_policy="empty")
    caps = {s["key"]: s["caption"] for s in ds}
    assert caps["nocap"] == "" and caps["emptycap"] == ""
    assert "missing_caption" not in ds.stats.skipped and "empty_caption" not in ds.stats.skipped
    assert ds.stats.converted["missing_caption_as_empty"] == 1 and ds.stats.converted["empty_caption_kept"] == 1
    assert ds.stats.skipped["bad_caption_encoding"] == 1  # non-UTF-8 is never "fixed"


@pytest.mark.parametrize("name,ok", [("a/b.png", True), ("/a.png", False), ("../a.png", False),
                                     ("a/../../b.png", False), ("C:/x.png", False), ("a\\..\\b.png", False)])
def test_member_names(name, ok):
    if ok:
        check_member_name(name)
    else:
        with pytest.raises(Exception, match="unsafe_member"):
            check_member_name(name)


def test_max_pixels_and_min_size_are_header_checks():
    stats = SkipStats()
    with pytest.raises(Exception, match="too_large"):
        decode_image(huge_header_png(3000), max_pixels=1000 * 1000, stats=stats)
    im = decode_image(png(Image.new("LA", (8, 8), (0, 0))), min_size=8, stats=stats)
    assert im.mode == "RGB" and im.getpixel((0, 0)) == (255, 255, 255) and stats.converted["alpha"] == 1


def test_an_endless_reader_reports_an_epoch_only_when_its_counts_differ_from_the_epoch_before(caplog):
    import logging

    caplog.set_level(logging.DEBUG, logger="ldm.data.validate")
    stats = SkipStats()

    def epoch(n, kept=10, bad=0, alpha=0):
        stats.kept += kept
        stats.skipped.update({"broken": bad} if bad else {})
        stats.converted.update({"alpha": alpha} if alpha else {})
        caplog.clear()
        stats.report_epoch(f"epoch {n}")
        return [(r.levelname, r.getMessage()) for r in caplog.records if r.levelno >= logging.INFO]

    assert epoch(0, bad=2) == [("WARNING", "epoch 0: kept 10, skipped {'broken': 2}, converted {}")]
    assert epoch(1, bad=2) == []  # the same two bad samples again: at debug level only
    assert "as the epoch before" in caplog.text
    assert epoch(2, bad=3, alpha=1) == [("WARNING", "epoch 2: kept 30, skipped {'broken': 7}, converted {'alpha': 1}")]
    assert epoch(3, bad=3, alpha=1) == []
    clean = SkipStats()
    caplog.clear()
    clean.kept = 5
    clean.report_epoch("clean")  # the first epoch is always reported
    assert [r.levelname for r in caplog.records if r.levelno >= logging.INFO] == ["INFO"]
