"""Folder reader (.txt, metadata.jsonl), shard specs (braces, lists, pipe:), make_shards, transforms, latent cache."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from ldm.data import (FolderDataset, ShardDataset, ShardWriter, braceexpand, expand_shards, make_dataloader,
                      read_latent_cache, write_latent_cache)
from ldm.data.transforms import ImageTransform, aspect_buckets, center_crop, fit, nearest_bucket, to_pil, to_tensor

ROOT = Path(__file__).resolve().parents[1]


def make_folder(root: Path, n: int = 6, jsonl: bool = False, size=(40, 24)) -> None:
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        Image.new("RGB", size, (10 * i, 0, 0)).save(root / f"img{i}.png")
        if jsonl:
            rows.append({"file_name": f"img{i}.png", "text": f"caption {i}"})
        else:
            (root / f"img{i}.txt").write_text(f"caption {i}\n")
    if jsonl:
        (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


@pytest.mark.parametrize("jsonl", [False, True])
def test_folder_reader(tmp_path, jsonl):
    make_folder(tmp_path / "f", jsonl=jsonl)
    if jsonl:  # a row whose file is missing, and a row without text
        with open(tmp_path / "f" / "metadata.jsonl", "a") as f:
            f.write(json.dumps({"file_name": "gone.png", "text": "x"}) + "\n")
            f.write(json.dumps({"file_name": "img0.png"}).replace("img0", "img5b") + "\n")
        Image.new("RGB", (40, 24)).save(tmp_path / "f" / "img5b.png")
    else:
        (tmp_path / "f" / "img5.txt").unlink()
    ds = FolderDataset(tmp_path / "f", size=16)
    samples = list(ds)
    caps = sorted(s["caption"] for s in samples)
    if jsonl:
        assert caps == [f"caption {i}" for i in range(6)]
        assert dict(ds.stats.skipped) == {"missing_image": 1, "missing_caption": 1}
    else:
        assert caps == [f"caption {i}" for i in range(5)]
        assert dict(ds.stats.skipped) == {"missing_caption": 1}
    assert samples[0]["image"].shape == (3, 16, 16) and samples[0]["key"] == "img0"
    assert len(ds) == (8 if jsonl else 6) and ds[1]["caption"] == ("caption 0" if jsonl else "caption 1")
    assert (ds[0] is None) == jsonl  # "gone.png" sorts first: a skipped sample is None


def test_upper_case_caption_files_are_read(tmp_path):
    """``IMG_1.JPG`` + ``IMG_1.TXT`` (as cameras and Windows tools name them) was skipped as "missing_caption"."""
    root = tmp_path / "f"
    root.mkdir()
    for i, (img, txt) in enumerate([("a.png", "a.txt"), ("B.PNG", "B.TXT"), ("c.JPG", "c.Txt")]):
        Image.new("RGB", (16, 16), (i * 80, 0, 0)).save(root / img, format="PNG" if "png" in img.lower() else "JPEG")
        (root / txt).write_text(f"caption {i}")
    ds = FolderDataset(root, size=16)
    assert sorted(s["caption"] for s in ds) == ["caption 0", "caption 1", "caption 2"]
    assert not ds.stats.skipped


def test_images_outside_metadata_jsonl_are_counted_in_a_warning(tmp_path, caplog):
    make_folder(tmp_path / "f", jsonl=True)
    Image.new("RGB", (16, 16)).save(tmp_path / "f" / "extra1.png")
    Image.new("RGB", (16, 16)).save(tmp_path / "f" / "extra2.jpg")
    ds = FolderDataset(tmp_path / "f", size=16)
    assert len(ds) == 6
    assert "2 image(s) under it are not among its rows and are not used, e.g. extra1.png, extra2.jpg" in caplog.text


def test_folder_metadata_bad_line_names_file(tmp_path):
    make_folder(tmp_path / "f", jsonl=True)
    with open(tmp_path / "f" / "metadata.jsonl", "a") as f:
        f.write("{oops\n")
    with pytest.raises(ValueError, match=r"metadata.jsonl line 7"):
        FolderDataset(tmp_path / "f")


def test_braceexpand_and_specs(tmp_path):
    assert braceexpand("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert braceexpand("{x,y}-{8..10}") == ["x-8", "x-9", "x-10", "y-8", "y-9", "y-10"]
    for i in range(3):
        with ShardWriter(str(tmp_path / f"s{i}-%06d.tar")) as w:
            w.write({"__key__": f"k{i}", "png": b"x", "txt": "t"})
    assert len(expand_shards(tmp_path)) == 3
    assert expand_shards([str(tmp_path / "s0-000000.tar"), str(tmp_path / "s{1..2}-000000.tar")]) == \
        [str(tmp_path / f"s{i}-000000.tar") for i in range(3)]


def test_pipe_refused_by_default(tmp_path):
    with ShardWriter(str(tmp_path / "p-%06d.tar")) as w:
        w.write({"__key__": "a", "png": _png(), "txt": "piped"})
    url = f"pipe:cat {tmp_path / 'p-000000.tar'}"
    with pytest.raises(ValueError, match="allow_pipe=True"):
        ShardDataset(url)
    with pytest.raises(ValueError, match="allow_pipe=True"):
        make_dataloader(url, 1, num_samples=1)
    assert [s["caption"] for s in ShardDataset(url, allow_pipe=True)] == ["piped"]


def _png(size=(16, 16)) -> bytes:
    import io
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def test_make_shards_script(tmp_path):
    make_folder(tmp_path / "src", n=7, size=(48, 32))
    Image.new("RGB", (1, 1)).save(tmp_path / "src" / "dot.png")
    (tmp_path / "src" / "dot.txt").write_text("too small")
    cmd = [sys.executable, str(ROOT / "scripts" / "make_shards.py"), str(tmp_path / "src"), str(tmp_path / "out"),
           "--size", "16", "--resize", "pad", "--max-count", "3"]
    subprocess.run(cmd, check=True, capture_output=True)
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert man["splits"]["train"]["count"] == 7 and len(man["splits"]["train"]["shards"]) == 3
    assert man["stats"]["skipped"] == {"too_small": 1}
    assert sum(1 for _ in ShardDataset(tmp_path / "out")) == 7  # the manifest's train split
    with pytest.raises(KeyError, match="split 'val'"):
        ShardDataset(tmp_path / "out", split="val")
    batches = list(make_dataloader(tmp_path / "out", 2))
    assert len(batches) == 3 and batches[0]["image"].shape == (2, 3, 16, 16)
    img = batches[0]["image"][0]
    assert img[:, 0, :].min() == 1.0 and img[:, 8, 8].max() < 0  # pad rows white, content dark red/black


def test_transforms_match_torchvision():
    torch.manual_seed(0)
    im = Image.fromarray(np.random.RandomState(0).randint(0, 256, (37, 53, 3), np.uint8))
    ref = TF.to_tensor(im) * 2 - 1
    assert torch.equal(to_tensor(im), ref)
    assert torch.equal(to_tensor(center_crop(im, 30)), TF.center_crop(ref, [30, 30]))
    assert to_pil(to_tensor(im)).tobytes() == im.tobytes()
    assert fit(im, 16, "center-crop").size == (16, 16) and fit(im, 16, "pad").size == (16, 16)
    asym = Image.new("RGB", (8, 8), (0, 0, 0))
    asym.paste((255, 255, 255), (0, 0, 4, 8))
    no_flip = ImageTransform(8, flip=False)
    assert all(no_flip(asym)[0, 0, 0] == 1.0 for _ in range(20))
    import random
    rng = random.Random(0)
    flips = [ImageTransform(8, flip=True)(asym, rng)[0, 0, 0].item() == -1.0 for _ in range(200)]
    assert 60 < sum(flips) < 140
    buckets = aspect_buckets(256)
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in buckets) and (256, 256) in buckets
    assert nearest_bucket(1000, 500, buckets)[0] > nearest_bucket(1000, 500, buckets)[1]


def test_latent_cache_roundtrip(tmp_path):
    make_folder(tmp_path / "f", n=6, size=(32, 32))
    loader = make_dataloader(tmp_path / "f", 2, size=32, seed=1)
    encode = lambda x: torch.nn.functional.avg_pool2d(x, 4)[:, :2]  # (B, 3, 32, 32) → (B, 2, 8, 8)  # noqa: E731
    text = lambda caps: torch.stack([torch.full((5, 4), float(c.split()[-1])) for c in caps])  # noqa: E731
    man = write_latent_cache(loader, encode, tmp_path / "lat", text_fn=text, max_count=4)
    assert man["splits"]["train"]["count"] == 6 and len(man["splits"]["train"]["shards"]) == 2
    assert man["latent_shape"] == [2, 8, 8] and man["context_shape"] == [5, 4]
    imgs = {s["key"]: s["image"] for s in FolderDataset(tmp_path / "f", size=32)}
    for s in read_latent_cache(tmp_path / "lat"):
        want = encode(imgs[s["key"]][None])[0]
        assert s["latent"].dtype == torch.float32 and (s["latent"] - want).abs().max() < 1e-3
        assert s["context"].shape == (5, 4) and s["context"][0, 0] == float(s["caption"].split()[-1])
    batch = next(iter(make_dataloader(tmp_path / "lat", 3)))
    assert batch["latent"].shape == (3, 2, 8, 8) and batch["context"].shape == (3, 5, 4) and len(batch["caption"]) == 3
