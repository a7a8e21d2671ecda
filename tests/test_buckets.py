"""Aspect-ratio buckets: the bucket set, fitting an image to its bucket, batching by shape in the training loader
(equal batch counts per rank, exact resume), training every image stage on mixed-aspect data, and the latent cache."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldm.cli.train import run
from ldm.data import make_dataloader
from ldm.data.distributed import batches_by_shape
from ldm.data.transforms import ImageTransform, aspect_buckets, fit, fit_bucket, nearest_bucket
from ldm.registry import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = "configs/tiny/txt2img.yaml"
# (w, h) of the source images: wide, tall, square, 10:7; 12 of each
SIZES = [(96, 40), (40, 96), (50, 50), (80, 56)]


@pytest.mark.parametrize("base, step, ratio", [(512, 64, 2.0), (768, 64, 2.0), (1024, 64, 1.5), (256, 32, 3.0),
                                               (64, 8, 2.0), (500, 64, 2.0), (512, 64, 1.0)])
def test_bucket_set_properties(base, step, ratio):
    buckets = aspect_buckets(base, step, ratio)
    assert buckets and list(buckets) == sorted(set(buckets))
    for w, h in buckets:
        assert w % step == 0 and h % step == 0
        assert w * h <= base * base  # never more pixels than the square bucket
        assert max(w / h, h / w) <= ratio + 1e-9
        assert min(w, h) >= max(step, int(base / math.sqrt(ratio)) // step * step)
        assert (h, w) in buckets  # both orientations
    assert ((base, base) in buckets) == (base % step == 0)


def test_sd_buckets_at_512():
    assert aspect_buckets(512) == ((320, 640), (384, 640), (448, 576), (512, 512), (576, 448), (640, 320),
                                   (640, 384))


@pytest.mark.parametrize("args, word", [((0, 64, 2.0), "positive"), ((512, 0, 2.0), "positive"),
                                        ((512, 1024, 2.0), "larger"), ((512, 64, 0.5), "max_ratio"),
                                        ((512, 64, float("nan")), "max_ratio"), ((512.0, 64, 2.0), "int")])
def test_bad_bucket_arguments_are_named(args, word):
    with pytest.raises(ValueError, match=word):
        aspect_buckets(*args)


def test_fit_to_the_nearest_bucket():
    buckets = aspect_buckets(512)
    assert nearest_bucket(1000, 500, buckets) == (640, 320)
    assert nearest_bucket(500, 1000, buckets) == (320, 640)
    assert nearest_bucket(800, 600, buckets) == (576, 448)  # 4:3 → 1.29
    assert nearest_bucket(777, 777, buckets) == (512, 512)
    im = Image.new("RGB", (1000, 500), (10, 20, 30))
    assert fit(im, 512, "bucket").size == (640, 320)
    exact = Image.new("RGB", (448, 576))
    assert fit_bucket(exact, (448, 576)) is exact  # already bucket-shaped: untouched (pre-bucketed shards)
    small = Image.new("RGB", (30, 20))
    assert fit_bucket(small, (64, 48)).size == (64, 48)  # upscaled to cover, then cropped


def test_bucket_crop_is_centred():
    """The crop removes equal margins: a wide image with a marked centre keeps the mark in the middle."""
    im = Image.new("RGB", (200, 100), (0, 0, 0))
    im.paste((255, 255, 255), (95, 0, 105, 100))  # a white stripe at the horizontal centre
    out = torch.tensor(list(fit_bucket(im, (64, 64)).convert("L").getdata()), dtype=torch.float32).view(64, 64)
    cols = out.mean(0)
    assert cols[30:34].min() > 200 and cols[:20].max() < 30 and cols[-20:].max() < 30


def test_transform_needs_a_size_with_buckets():
    with pytest.raises(ValueError, match="needs size"):
        ImageTransform(None, "bucket")
    t = ImageTransform(32, "bucket", bucket_step=8)
    assert t(Image.new("RGB", (96, 40))).shape == (3, 16, 32)  # (3, H, W): the wide (32, 16) bucket


def _s(key: str, shape: tuple[int, ...]) -> dict:
    return {"key": key, "image": torch.zeros(shape)}


def test_batches_by_shape_order_partial_and_limit():
    samples = [_s("a1", (3, 2, 4)), _s("b1", (3, 4, 2)), _s("a2", (3, 2, 4)), _s("b2", (3, 4, 2)),
               _s("a3", (3, 2, 4)), _s("c1", (3, 3, 3))]
    full = [[s["key"] for s in b] for b in batches_by_shape(iter(samples), 2)]
    assert full == [["a1", "a2"], ["b1", "b2"]]  # in the order they fill up; the rest waits
    rest = [[s["key"] for s in b] for b in batches_by_shape(iter(samples), 2, partial=True)]
    assert rest == [["a1", "a2"], ["b1", "b2"], ["a3"], ["c1"]]
    one = [_s(f"k{i}", (3, 4, 4)) for i in range(6)]
    assert [[s["key"] for s in b] for b in batches_by_shape(iter(one), 3)] == [["k0", "k1", "k2"], ["k3", "k4", "k5"]]
    many = [_s(f"x{i}", (3, 8 + i, 8)) for i in range(5)]
    with pytest.raises(ValueError, match="more than 4 sample shapes.*resize=bucket"):
        list(batches_by_shape(iter(many), 2, max_shapes=4))


def make_folder(root: Path, sizes: list[tuple[int, int]] = SIZES, per_size: int = 12) -> dict[str, tuple[int, int]]:
    """An image folder with ``per_size`` images of each (w, h) and a caption each; returns key → source size."""
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for j, (w, h) in enumerate(sizes):
        for i in range(per_size):
            key = f"img{j}_{i:02d}"
            grad = Image.linear_gradient("L").resize((w, h)).convert("RGB")
            Image.blend(grad, Image.new("RGB", (w, h), (40 * j, 20 * i % 255, 90)), 0.5).save(root / f"{key}.png")
            (root / f"{key}.txt").write_text(f"shape {j} image {i}", encoding="utf-8")
            out[key] = (w, h)
    return out


def _keys_and_shapes(loader) -> list[tuple[list[str], tuple[int, ...]]]:
    return [(list(b["key"]), tuple(b["image"].shape)) for b in loader]


def test_loader_batches_each_bucket_alone_across_ranks_and_resumes(tmp_path):
    sources = make_folder(tmp_path / "folder")
    buckets = aspect_buckets(32, 8)
    opts = dict(size=32, resize="bucket", bucket_step=8, shuffle_buffer=8, seed=3)
    per_rank = []
    for rank in range(2):
        loader = make_dataloader(tmp_path / "folder", 4, rank=rank, world_size=2, **opts)
        batches = _keys_and_shapes(loader)
        assert len(batches) == len(loader) == 48 // (2 * 4)  # equal batch counts on every rank
        for keys, shape in batches:
            assert shape[:2] == (4, 3)
            w, h = nearest_bucket(*sources[keys[0]], buckets)
            assert shape[2:] == (h, w)  # (B, 3, H, W) of the bucket
            assert all(nearest_bucket(*sources[k], buckets) == (w, h) for k in keys)  # one bucket per batch
        per_rank.append(batches)
    assert len({s for b in per_rank for _, s in b}) >= 3  # several buckets really occur
    # resume after 2 batches of rank 1: the rest of its epoch, unchanged
    resumed = make_dataloader(tmp_path / "folder", 4, rank=1, world_size=2, start_batch=2, **opts)
    assert _keys_and_shapes(resumed) == per_rank[1][2:]
    # two DataLoader workers, each batching its own stream by shape: one bucket per batch, the same count, and a
    # resume after 3 batches (an odd number: the workers' roles rotate) gives the rest unchanged
    two = _keys_and_shapes(make_dataloader(tmp_path / "folder", 4, rank=1, world_size=2, num_workers=2, **opts))
    assert len(two) == 6 and all(len({nearest_bucket(*sources[k], buckets) for k in keys}) == 1 for keys, _ in two)
    tail = make_dataloader(tmp_path / "folder", 4, rank=1, world_size=2, num_workers=2, start_batch=3, **opts)
    assert _keys_and_shapes(tail) == two[3:]


def test_unbucketed_images_of_one_size_batch_as_before(tmp_path):
    """resize=none with equal sizes: consecutive batching (the shape grouping changes nothing)."""
    make_folder(tmp_path / "f", sizes=[(24, 24)], per_size=16)
    batches = _keys_and_shapes(make_dataloader(tmp_path / "f", 4, resize="none", shuffle_buffer=1, seed=0))
    assert len(batches) == 4 and all(s == (4, 3, 24, 24) for _, s in batches)


def test_diffusion_trains_on_buckets_and_resumes_exactly(tmp_path):
    make_folder(tmp_path / "folder")
    common = ["--config", TINY, f"data.train={tmp_path / 'folder'}", "data.num_samples=null", "data.resize=bucket",
              "data.bucket_step=8", "data.shuffle_buffer=8", "train.checkpoint.every_n_steps=3",
              "trainer.log_every_n_steps=1"]
    whole = run(common + ["--run-dir", str(tmp_path / "whole"), "trainer.max_steps=6"])
    assert whole.global_step == 6
    run(common + ["--run-dir", str(tmp_path / "part"), "trainer.max_steps=3"])
    run(common + ["--run-dir", str(tmp_path / "part"), "trainer.max_steps=6", "--resume", "auto"])
    from ldm.checkpoint import read_state_dict

    a, b = read_state_dict(tmp_path / "whole" / "model.safetensors")[0], read_state_dict(
        tmp_path / "part" / "model.safetensors")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_autoencoder_trains_on_buckets(tmp_path):
    make_folder(tmp_path / "folder", per_size=4)
    trainer = run(["--config", "configs/tiny/autoencoder.yaml", "--run-dir", str(tmp_path / "ae"),
                   f"data.train={tmp_path / 'folder'}", "data.num_samples=null", "data.resize=bucket",
                   "data.bucket_step=8", "data.batch_size=2", "trainer.max_steps=3"])
    assert trainer.global_step == 3


@pytest.mark.parametrize("config, overrides, match", [
    ("configs/tiny/clip.yaml", ["data.resize=bucket", "data.bucket_step=8"], "image tower takes one size"),
    (TINY, ["data.resize=bucket", "data.bucket_step=6"], "bucket_step=6 is not a multiple of the autoencoder"),
    (TINY, ["data.resize=bucket", "data.bucket_step=0"], "data.bucket_step"),
    (TINY, ["data.resize=bucket", "data.bucket_max_ratio=0.5"], "data.bucket_max_ratio"),
    (TINY, ["data.resize=bucket", "data.size=null"], "needs size"),
    (TINY, ["data.resize=squash"], "resize must be one of"),
])
def test_bad_bucket_configs_are_named(tmp_path, config, overrides, match):
    with pytest.raises(ConfigError, match=match):
        run(["--config", config, "--run-dir", str(tmp_path), "trainer.max_steps=1", *overrides])


def test_bucketed_latent_cache_trains(tmp_path):
    make_folder(tmp_path / "folder", per_size=5)
    run(["--config", TINY, "--run-dir", str(tmp_path / "base"), "trainer.max_steps=1"])
    subprocess.run([sys.executable, str(ROOT / "scripts" / "cache_latents.py"), "--model",
                    str(tmp_path / "base" / "model.safetensors"), "--data", str(tmp_path / "folder"), "--out",
                    str(tmp_path / "cache"), "--resize", "bucket", "--size", "32", "--bucket-step", "8",
                    "--batch-size", "4"], check=True, cwd=ROOT, capture_output=True)
    man = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    # the tiny autoencoder downsamples 4×: buckets (32, 16), (16, 32), (32, 32), (40, 24) → latents (C, H/4, W/4)
    assert man["latent_shape"] is None
    assert man["latent_shapes"] == {"4x4x8": 5, "4x8x4": 5, "4x8x8": 5, "4x6x10": 5}
    assert man["splits"]["train"]["count"] == 20
    loader = make_dataloader(tmp_path / "cache", 2, shuffle_buffer=4)
    shapes = [tuple(b["latent"].shape) for b in loader]
    assert len(shapes) == 10 and len(set(shapes)) >= 2 and all(s[:2] == (2, 4) for s in shapes)
    trainer = run(["--config", TINY, "--run-dir", str(tmp_path / "cached"), f"data.train={tmp_path / 'cache'}",
                   "data.num_samples=null", "data.batch_size=2", "trainer.max_steps=3"])
    assert trainer.global_step == 3


def test_make_shards_pre_buckets(tmp_path):
    make_folder(tmp_path / "folder", per_size=2)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_shards.py"), str(tmp_path / "folder"),
                    str(tmp_path / "shards"), "--size", "32", "--resize", "bucket", "--bucket-step", "8"],
                   check=True, cwd=ROOT, capture_output=True)
    man = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert man["resize"] == "bucket" and man["bucket_step"] == 8 and man["splits"]["train"]["count"] == 8
    loader = make_dataloader(tmp_path / "shards", 2, resize="none", shuffle_buffer=1)
    assert {tuple(b["image"].shape[2:]) for b in loader} == {(16, 32), (32, 16), (32, 32), (24, 40)}
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_shards.py"), str(tmp_path / "folder"),
                          str(tmp_path / "x"), "--size", "32", "--resize", "bucket", "--bucket-step", "64"],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "bucket step 64 is larger than the bucket side 32" in bad.stderr


def test_compiled_training_keeps_a_graph_per_bucket(tmp_path):
    """train.compile with buckets: one static-shape graph per bucket, within a cache raised to hold them all."""
    import torch._dynamo.config as dynamo_config

    make_folder(tmp_path / "folder", per_size=4)
    limit = dynamo_config.cache_size_limit
    try:
        dynamo_config.cache_size_limit = 2
        trainer = run(["--config", TINY, "--run-dir", str(tmp_path / "run"), f"data.train={tmp_path / 'folder'}",
                       "data.num_samples=null", "data.resize=bucket", "data.bucket_step=8", "data.batch_size=2",
                       "data.shuffle_buffer=1", "train.compile=aot_eager", "trainer.max_steps=4"])
        assert trainer.global_step == 4
        assert dynamo_config.cache_size_limit == len(aspect_buckets(32, 8)) + 2
    finally:
        dynamo_config.cache_size_limit = limit
        torch._dynamo.reset()
