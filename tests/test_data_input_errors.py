"""Bad data input fails early with one line naming the key, file or argument (ldm.data, ldm.training.datamodule,
scripts/make_shards.py, the latent cache)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.data import make_dataloader, write_latent_cache
from ldm.registry import ConfigError
from ldm.training.datamodule import DataModule

ROOT = Path(__file__).resolve().parents[1]
SHARD = ROOT / "tests" / "fixtures" / "emoji" / "emoji32-000000.tar"
SCRIPT = ROOT / "scripts" / "make_shards.py"


def _folder(root: Path, n: int = 12, size=(32, 32), captions: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (10 * i, 0, 0)).save(root / f"img{i:02d}.png")
        if captions:
            (root / f"img{i:02d}.txt").write_text(f"caption {i}")
    return root


def _module(train_cfg: dict | None = None, **data) -> DataModule:
    base = {"train": str(SHARD), "batch_size": 2, "num_samples": 8, "size": 32}
    return DataModule(OmegaConf.create({"data": {**base, **data}, "train": train_cfg or {}}))


def _make_shards(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=ROOT)


# 1. data.num_samples on an image folder

def test_num_samples_limits_an_image_folder(tmp_path):
    folder = _folder(tmp_path / "f", n=12)
    loader = make_dataloader(folder, 2, num_samples=4, size=32)
    assert len(loader) == 2
    keys = sorted(k for b in loader for k in b["key"])
    assert keys == ["img00", "img01", "img02", "img03"]  # the first files in sorted order


def test_num_samples_larger_than_the_folder_is_named(tmp_path):
    folder = _folder(tmp_path / "f", n=3)
    with pytest.raises(ConfigError, match=r"data.num_samples=10: image folder .* holds only 3 images"):
        _module(train=str(folder), num_samples=10)


# 2. splits need a manifest

@pytest.mark.parametrize("key", ["split", "val_split"])
def test_a_split_of_data_without_a_manifest_is_refused(key, tmp_path):
    folder = _folder(tmp_path / "f", n=4)
    with pytest.raises(ConfigError, match=rf"data.{key}='heldout': data.train=.* has no manifest.json.*"
                                          r"scripts/make_shards.py"):
        _module(train=str(folder), num_samples=None, **{key: "heldout"})


def test_split_train_on_a_tar_and_val_split_with_a_manifestless_val_still_work(caplog):
    """The emoji configs say split: train / val_split: heldout; tests override data.train/data.val with a .tar."""
    dm = _module(split="train", val_split="heldout", val=str(SHARD), val_num_samples=8)
    assert "data.val_split='heldout' is not used" in caplog.text
    assert len(dm._loader(0, 0, 1, val=True)) == 4


def test_an_unknown_split_of_a_manifest_names_the_key(tmp_path):
    _folder(tmp_path / "src", n=4)
    assert _make_shards(tmp_path / "src", tmp_path / "out", "--size", "16").returncode == 0
    with pytest.raises(ConfigError, match=r"data.split: split 'nope' not in"):
        _module(train=str(tmp_path / "out"), num_samples=None, split="nope")


# 3. "yielded no samples" says why

def test_no_usable_samples_names_the_skip_counts_and_min_size():
    loader = make_dataloader(SHARD, 4, num_samples=240, size=32, min_size=64,
                             arg_names={"min_size": "data.min_size"})
    with pytest.raises(RuntimeError, match=r"yielded no usable samples: skipped \{'too_small': 240\} "
                                           r"\(data.min_size=64"):
        next(iter(loader))


def test_no_usable_samples_names_the_caption_policy(tmp_path):
    folder = _folder(tmp_path / "f", n=4, captions=False)
    dm = _module(train=str(folder), num_samples=None)
    with pytest.raises(RuntimeError, match=r"skipped \{'missing_caption': 4\} \(data.caption_policy='skip'"):
        next(iter(dm._loader(0, 0, 1)))


# 4. missing paths and missing counts name the key, at start-up

def test_a_missing_val_file_is_not_found_at_start_up(tmp_path):
    with pytest.raises(ConfigError, match=r"data.val: '.*nonexistent.tar' not found"):
        _module(val=str(tmp_path / "nonexistent.tar"), val_num_samples=8)


def test_a_missing_train_path_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"data.train: '.*missing-\{000..003\}.tar' not found|"
                                          r"data.train: '.*missing-000.tar' not found \(and 3 more of 4 shards\)"):
        _module(train=str(tmp_path / "missing-{000..003}.tar"))


def test_a_val_tar_without_a_count_names_val_num_samples():
    with pytest.raises(ConfigError, match=r"data.val=.* has no known sample count: set data.val_num_samples"):
        _module(val=str(SHARD))


def test_a_train_tar_without_a_count_names_num_samples():
    with pytest.raises(ConfigError, match=r"data.train=.* has no known sample count: set data.num_samples"):
        _module(num_samples=None)


# 5. types and ranges of the data keys

@pytest.mark.parametrize("key,value,want", [
    ("batch_size", 0, "an int ≥ 1"), ("batch_size", "abc", "an int ≥ 1"), ("num_samples", "abc", "an int ≥ 1"),
    ("num_samples", 0, "an int ≥ 1"), ("size", "abc", "an int ≥ 1"), ("shuffle_buffer", "abc", "an int ≥ 1"),
    ("min_size", "abc", "an int ≥ 0"), ("min_size", -1, "an int ≥ 0"), ("num_workers", -1, "an int ≥ 0"),
    ("num_workers", 1.5, "an int ≥ 0"), ("val_num_samples", "x", "an int ≥ 1"), ("flip", "yes", "true or false"),
    ("caption_policy", "drop", "one of skip, empty"), ("split", 3, "a split name or null"),
])
def test_data_values_are_checked_in_the_constructor(key, value, want):
    with pytest.raises(ConfigError, match=rf"data.{key}: expected {want}"):
        _module(**{key: value})


def test_make_dataloader_refuses_batch_size_zero():
    with pytest.raises(ValueError, match="batch_size: expected a positive int, got 0"):
        make_dataloader(SHARD, 0, num_samples=8, size=32)


# 6. scripts/make_shards.py

def test_make_shards_merges_a_second_split_into_the_manifest(tmp_path):
    _folder(tmp_path / "a", n=4)
    _folder(tmp_path / "b", n=3)
    assert _make_shards(tmp_path / "a", tmp_path / "out", "--size", "16").returncode == 0
    r = _make_shards(tmp_path / "b", tmp_path / "out", "--size", "16", "--split", "heldout")
    assert r.returncode == 0, r.stderr
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert {k: v["count"] for k, v in man["splits"].items()} == {"train": 4, "heldout": 3}
    assert man["stats"]["kept"] == 7
    assert len(make_dataloader(tmp_path / "out", 1, split="train", size=16)) == 4
    assert len(make_dataloader(tmp_path / "out", 1, split="heldout", size=16)) == 3


def test_make_shards_refuses_a_split_of_another_size(tmp_path):
    _folder(tmp_path / "a", n=2)
    assert _make_shards(tmp_path / "a", tmp_path / "out", "--size", "16").returncode == 0
    r = _make_shards(tmp_path / "a", tmp_path / "out", "--size", "24", "--split", "val")
    assert r.returncode != 0 and "size=16" in r.stderr and "size=24" in r.stderr
    assert list(json.loads((tmp_path / "out" / "manifest.json").read_text())["splits"]) == ["train"]


@pytest.mark.parametrize("args,msg", [
    (["--size", "0"], "--size: expected an int ≥ 1"), (["--size", "16", "--max-count", "0"], "--max-count"),
    (["--size", "16", "--quality", "0"], "--quality: expected an int in 1..100"),
    (["--size", "16", "--quality", "101"], "--quality"),
])
def test_make_shards_refuses_bad_numbers(tmp_path, args, msg):
    _folder(tmp_path / "a", n=1)
    r = _make_shards(tmp_path / "a", tmp_path / "out", *args)
    assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr


def test_make_shards_missing_source_is_one_line(tmp_path):
    r = _make_shards(tmp_path / "nope", tmp_path / "out", "--size", "16")
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr


def test_make_shards_all_skipped_fails_with_the_counts(tmp_path):
    _folder(tmp_path / "a", n=3, size=(4, 4))
    r = _make_shards(tmp_path / "a", tmp_path / "out", "--size", "16")
    assert r.returncode == 1 and "{'too_small': 3}" in r.stderr
    assert not (tmp_path / "out" / "manifest.json").exists() and not list((tmp_path / "out").glob("*.tar"))


def _shards_main(*args) -> int:
    from script_loader import load_script

    return load_script("make_shards").main([str(a) for a in args])


@pytest.mark.parametrize("out, msg", [("afile", "'afile': exists and is not a folder"),
                                      ("afile/sub", "'afile' is a file")])
def test_make_shards_output_path_that_is_a_file_is_one_line(tmp_path, monkeypatch, capsys, out, msg):
    """Was a NotADirectoryError traceback from mkdir."""
    _folder(tmp_path / "a", n=1)
    (tmp_path / "afile").write_text("x")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        _shards_main("a", out, "--size", "16")
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err and "Traceback" not in err


@pytest.mark.parametrize("content, msg", [
    (b'{"file_name": "img00.png", "text": "a"}\nnot json\n', "metadata.jsonl line 2: expected a JSON object"),
    ('{"file_name": "img00.png", "text": "caf\xe9"}\n'.encode("latin-1"), "metadata.jsonl: not UTF-8 text"),
])
def test_make_shards_bad_metadata_is_one_line_naming_the_file(tmp_path, capsys, content, msg):
    """Were tracebacks (the second without the file's name: a bare UnicodeDecodeError)."""
    _folder(tmp_path / "a", n=1, captions=False)
    (tmp_path / "a" / "metadata.jsonl").write_bytes(content)
    assert _shards_main(tmp_path / "a", tmp_path / "out", "--size", "16") == 2
    err = capsys.readouterr().err
    assert msg in err and str(tmp_path / "a") in err and not (tmp_path / "out").exists()


def test_make_shards_names_a_file_listed_twice_in_the_metadata(tmp_path, caplog):
    """The later row's caption silently won, one image where the file had two rows."""
    _folder(tmp_path / "a", n=2, captions=False)
    rows = [{"file_name": "img00.png", "text": "a"}, {"file_name": "img01.png", "text": "b"},
            {"file_name": "img00.png", "text": "c"}]
    (tmp_path / "a" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _shards_main(tmp_path / "a", tmp_path / "out", "--size", "16") == 0
    assert "1 row(s) repeat a file_name" in caplog.text and "'img00.png' on lines 1 and 3" in caplog.text


def test_make_shards_failing_midway_leaves_the_previous_split_and_nothing_else(tmp_path, monkeypatch, capsys):
    """An unreadable file in the middle of a rebuild: the earlier shards and manifest stay, the shards written aside
    are removed (the hidden .train-new folder was left behind)."""
    from ldm.data import folder

    _folder(tmp_path / "a", n=6)
    assert _shards_main(tmp_path / "a", tmp_path / "out", "--size", "16", "--max-count", "2") == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    real, seen = folder.FolderSource._raw, []

    def flaky(self, index, stats):
        seen.append(index)
        if len(seen) == 5:
            raise PermissionError(f"[Errno 13] Permission denied: '{self.root / self.entries[index][0]}'")
        return real(self, index, stats)

    monkeypatch.setattr(folder.FolderSource, "_raw", flaky)
    assert _shards_main(tmp_path / "a", tmp_path / "out", "--size", "16", "--max-count", "2") == 2
    assert "Permission denied" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_make_shards_manifest_write_failing_keeps_the_previous_manifest(tmp_path, monkeypatch, capsys):
    _folder(tmp_path / "a", n=2)
    assert _shards_main(tmp_path / "a", tmp_path / "out", "--size", "16") == 0
    before = (tmp_path / "out" / "manifest.json").read_text()
    real = Path.write_text

    def disk_full(self, text, *a, **k):
        real(self, text[:10], *a, **k)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    assert _shards_main(tmp_path / "a", tmp_path / "out", "--size", "16", "--split", "heldout") == 2
    monkeypatch.undo()
    assert (tmp_path / "out" / "manifest.json").read_text() == before


# 7. the latent cache keeps the other splits

def _batches(n: int, keys: str):
    return [{"image": torch.zeros(2, 3, 8, 8), "caption": ["a", "b"], "key": [f"{keys}{i}a", f"{keys}{i}b"]}
            for i in range(n)]


def test_latent_cache_merges_a_second_split(tmp_path):
    enc = lambda x: x[:, :, ::2, ::2]  # noqa: E731
    write_latent_cache(_batches(2, "t"), enc, tmp_path / "c", split="train")
    man = write_latent_cache(_batches(1, "h"), enc, tmp_path / "c", split="heldout")
    assert {k: v["count"] for k, v in man["splits"].items()} == {"train": 4, "heldout": 2}
    assert man["latent_shapes"] == {"3x4x4": 6} and man["latent_shape"] == [3, 4, 4]
    assert json.loads((tmp_path / "c" / "manifest.json").read_text()) == man
    with pytest.raises(ValueError, match="dtype='float16', this run dtype='float32'"):
        write_latent_cache(_batches(1, "v"), enc, tmp_path / "c", split="val", dtype="float32")
