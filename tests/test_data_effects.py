"""Data options reach the behaviour they claim: keys that read back, options a latent cache cannot honour, flips
per worker and epoch, split selection, seeds, worker splitting and the resume position of the training stream."""
from __future__ import annotations

import argparse
import io
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.data import FolderDataset, ShardDataset, ShardWriter, collate, make_dataloader, read_latent_cache
from ldm.data import write_latent_cache
from ldm.data.distributed import EqualBatchesIterable, batches_by_shape
from ldm.registry import ConfigError
from ldm.training.datamodule import BatchStream, DataModule

ROOT = Path(__file__).resolve().parents[1]


def _png(color=(0, 0, 0), size=(8, 8), half_white: bool = False) -> bytes:
    im = Image.new("RGB", size, color)
    if half_white:  # left half white: a flip moves it right
        im.paste((255, 255, 255), (0, 0, size[0] // 2, size[1]))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _shards(root: Path, split: str, n_shards: int, per: int, **kw) -> list[str]:
    names = []
    for s in range(n_shards):
        with ShardWriter(str(root / f"{split}{s}-%06d.tar")) as w:
            for i in range(per):
                w.write({"__key__": f"{split}_{s}_{i}", "png": _png((s * 20, i * 20, 0), **kw), "txt": f"{s} {i}"})
        names.append(f"{split}{s}-000000.tar")
    return names


def _manifest_dir(root: Path, splits: dict[str, tuple[int, int]], **kw) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    entries = {sp: {"shards": _shards(root, sp, n, per, **kw), "count": n * per} for sp, (n, per) in splits.items()}
    (root / "manifest.json").write_text(json.dumps({"format": "ldm-shards/1", "kind": "images", "splits": entries}))
    return root


def _folder(root: Path, names: list[str]) -> Path:
    root.mkdir(parents=True)
    for i, name in enumerate(names):
        Image.new("RGB", (8, 8), (i * 30, 0, 0)).save(root / name)
        (root / name).with_suffix(".txt").write_text(f"caption {i}")
    return root


# -- bugs -------------------------------------------------------------------------------------------------------

COLLIDING = ["photo.v1.png", "photo.v2.png", "img.jpg", "img.png", "a.b.png", "a_b.png"]  # 6 images, 6 samples


def test_a_latent_cache_reads_back_every_sample_it_counts_dotted_and_repeated_keys_too(tmp_path):
    ds = FolderDataset(_folder(tmp_path / "f", COLLIDING), size=8)
    batches = (collate(b) for b in batches_by_shape(iter(ds), 2, partial=True))
    man = write_latent_cache(batches, lambda x: x[:, :, ::4, ::4], tmp_path / "cache")
    back = list(read_latent_cache(tmp_path / "cache"))
    assert man["splits"]["train"]["count"] == len(back) == 6
    assert len({s["key"] for s in back}) == 6


def test_make_shards_keeps_every_image_whose_key_collides(tmp_path):
    src = _folder(tmp_path / "f", COLLIDING)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_shards.py"), str(src), str(tmp_path / "out"),
                    "--size", "8"], check=True, capture_output=True, cwd=ROOT)
    count = json.loads((tmp_path / "out" / "manifest.json").read_text())["splits"]["train"]["count"]
    ds = ShardDataset(tmp_path / "out")
    assert count == len(list(ds)) == 6 and not ds.stats.skipped


@pytest.mark.parametrize("keys", [["a.b"], ["k", "k"], ["dir/x.y"]])
def test_shard_writer_refuses_a_key_that_would_not_read_back_alone(tmp_path, keys):
    with pytest.raises(ValueError, match="shard_key"):
        with ShardWriter(str(tmp_path / "s-%06d.tar")) as w:
            for k in keys:
                w.write({"__key__": k, "txt": "x"})


def test_cache_latents_refuses_several_splits_of_data_without_a_manifest(tmp_path):
    from ldm.cli.cache_latents import check_data

    folder = _folder(tmp_path / "f", ["a.png"])
    p = argparse.ArgumentParser()
    check_data(p, argparse.Namespace(data=str(folder), split="heldout", splits=["heldout"]))  # one: names the split
    with pytest.raises(SystemExit):
        check_data(p, argparse.Namespace(data=str(folder), split="train,heldout", splits=["train", "heldout"]))


def _latent_cache(tmp_path: Path, extra: dict) -> Path:
    batches = [{"image": torch.rand(4, 3, 8, 8) * 2 - 1, "caption": ["c"] * 4, "key": [f"k{i}" for i in range(4)]}]
    write_latent_cache(batches, lambda x: x[:, :, ::4, ::4], tmp_path / "cache", extra=extra)
    return tmp_path / "cache"


def _dm(**data) -> DataModule:
    return DataModule(OmegaConf.create({"data": {"batch_size": 2, **data}, "train": {}}))


@pytest.mark.parametrize("data,match", [({"flip": True}, "data.flip"), ({"size": 16}, "data.size=16"),
                                        ({"resize": "pad"}, "data.resize='pad'")])
def test_options_a_latent_cache_cannot_apply_are_refused(tmp_path, data, match):
    cache = str(_latent_cache(tmp_path, {"size": 8, "resize": "center-crop"}))
    _dm(train=cache, size=8, resize="center-crop")  # what it was encoded with: fine
    with pytest.raises(ConfigError, match=match):
        _dm(train=cache, **data)


# -- mechanisms found correct -------------------------------------------------------------------------------------

def _flipped(batch: dict) -> list[bool]:
    return [bool(x[0, 0, 0] < 0) for x in batch["image"]]  # the white left column went right


def test_flips_differ_between_workers_and_epochs(tmp_path):
    paths = [str(tmp_path / n) for n in _shards(tmp_path, "t", 4, 8, half_white=True)]

    def flips(epoch: int, worker: int) -> list[bool]:
        it = EqualBatchesIterable(make_dataloader(paths, 4, num_samples=32, flip=True).source, 4, epoch=epoch,
                                  shuffle_buffer=1)
        return [f for b in it._epoch_batches(epoch, worker, 2, 0) for f in _flipped(b)]

    w0, w1, w0_next = flips(0, 0), flips(0, 1), flips(1, 0)
    assert 0 < sum(w0) < len(w0) and w0 != w1 and w0 != w0_next
    assert not any(_flipped(b)[0] for b in make_dataloader(paths, 4, num_samples=32, flip=False))


def test_data_flip_is_on_for_training_and_off_for_validation(tmp_path):
    root = _manifest_dir(tmp_path / "d", {"train": (2, 8), "heldout": (1, 8)}, half_white=True)
    dm = _dm(train=str(root), val_split="heldout", flip=True, shuffle_buffer=1)
    assert any(f for b in dm._loader(0, 0, 1) for f in _flipped(b))
    assert not any(f for b in dm.val_batches(0, 1, 10) for f in _flipped(b))


def test_val_split_reads_that_split_of_the_train_manifest(tmp_path):
    root = _manifest_dir(tmp_path / "d", {"train": (2, 4), "heldout": (1, 4)})
    dm = _dm(train=str(root), split="train", val_split="heldout")
    assert {k for b in dm.val_batches(0, 1, 10) for k in b["key"]} == {f"heldout_0_{i}" for i in range(4)}
    assert all(k.startswith("train_") for b in dm._loader(0, 0, 1) for k in b["key"])


def test_data_seed_wins_over_train_seed_and_changes_the_order(tmp_path):
    root = _manifest_dir(tmp_path / "d", {"train": (4, 4)})
    dm = DataModule(OmegaConf.create({"data": {"train": str(root), "batch_size": 2, "seed": 5},
                                      "train": {"seed": 1}}))
    assert dm._loader(0, 0, 1).seed == 5
    order = [[k for b in make_dataloader(root, 2, seed=s) for k in b["key"]] for s in (5, 6)]
    assert sorted(order[0]) == sorted(order[1]) and order[0] != order[1]


def test_workers_and_ranks_read_disjoint_samples(tmp_path):
    paths = [str(tmp_path / n) for n in _shards(tmp_path, "t", 8, 3)]
    keys = [k for r in range(2) for b in make_dataloader(paths, 2, rank=r, world_size=2, num_workers=2,
                                                         num_samples=24, shuffle_buffer=2) for k in b["key"]]
    assert len(keys) == len(set(keys)) == 24


@pytest.mark.parametrize("start", [0, 5, 9])
def test_batch_stream_resumes_at_the_batch_after_batches_seen(tmp_path, start):
    paths = [str(tmp_path / n) for n in _shards(tmp_path, "t", 3, 5)]

    def make(epoch: int):
        return make_dataloader(paths, 2, num_samples=15, seed=3, shuffle_buffer=2, epoch=epoch)

    full = [b["key"] for b in itertools.islice(BatchStream(make, 0), 14)]  # 7 batches per epoch, 2 epochs
    assert [b["key"] for b in itertools.islice(BatchStream(make, start), 14 - start)] == full[start:]
