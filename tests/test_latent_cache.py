"""The latent cache: shards written whole or not at all, encoders fingerprinted, a cache built before the first U-Net
run from the U-Net config and the stage exports (scripts/cache_latents.py --config), reused when up to date,
refused by training when it was encoded by another autoencoder."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldm.cli.cache_latents import main as cache_main
from ldm.cli.train import run
from ldm.config import load_config
from ldm.data import ShardWriter, read_latent_cache, write_latent_cache
from ldm.data.latent_cache import DECODER_PARTS, fingerprint
from ldm.loading import build

TINY = "configs/tiny/txt2img.yaml"
FIXTURE = Path("tests/fixtures/emoji/emoji32-000000.tar")


def _batches(n: int, fail_at: int | None = None):
    for i in range(n):
        if i == fail_at:
            raise RuntimeError("encoder crashed")
        yield {"image": torch.full((2, 3, 8, 8), float(i)), "caption": ["a", "b"], "key": [f"k{i}a", f"k{i}b"]}


def test_shard_writer_drops_the_unfinished_shard(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(str(tmp_path / "s-%06d.tar"), max_count=2) as w:
            for i in range(3):
                w.write({"__key__": f"k{i}", "txt": "x"})
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s-000000.tar"]  # finished; the second one is gone
    assert w.shards == [str(tmp_path / "s-000000.tar")] and w.counts == [2]


def test_an_interrupted_rewrite_leaves_the_cache_as_it_was(tmp_path):
    enc = lambda x: x[:, :, ::2, ::2]  # noqa: E731
    write_latent_cache(_batches(3), enc, tmp_path / "c", split="train", max_count=2)
    before = {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()}
    with pytest.raises(RuntimeError, match="encoder crashed"):
        write_latent_cache(_batches(3, fail_at=2), enc, tmp_path / "c", split="train", max_count=2)
    assert {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()} == before  # no aside folder either
    assert [s["key"] for s in read_latent_cache(tmp_path / "c")] == ["k0a", "k0b", "k1a", "k1b", "k2a", "k2b"]


def test_fingerprint_ignores_dtype_and_the_decoder():
    torch.manual_seed(0)
    net = build(load_config(TINY))
    vae = net.first_stage_model.half().float()  # the weights of a float16 file (SD's releases), loaded in float32
    fp = fingerprint(vae, DECODER_PARTS)
    assert fingerprint(vae.half(), DECODER_PARTS) == fp  # and loaded in float16 (as a GPU cache run does)
    vae.float()
    with torch.no_grad():
        next(vae.decoder.parameters()).add_(1.0)
        assert fingerprint(vae, DECODER_PARTS) == fp
        next(vae.encoder.parameters()).mul_(1.01)
    assert fingerprint(vae, DECODER_PARTS) != fp


@pytest.fixture(scope="module")
def stage_exports(tmp_path_factory) -> dict[str, Path]:
    """The tiny model's autoencoder and text encoder as separate files (what the stages export), a second
    autoencoder with other weights, and a shard folder with a train and a heldout split."""
    d = tmp_path_factory.mktemp("exports")
    torch.manual_seed(0)
    net = build(load_config(TINY))
    save_file(net.first_stage_model.state_dict(), d / "ae.safetensors")
    save_file({k: v.contiguous() for k, v in net.cond_stage_model.state_dict().items()}, d / "text.safetensors")
    other = {k: v + 0.01 if v.is_floating_point() else v for k, v in net.first_stage_model.state_dict().items()}
    save_file(other, d / "ae-other.safetensors")
    data = d / "data"
    data.mkdir()
    for split in ("train", "heldout"):
        shutil.copy(FIXTURE, data / f"{split}-000000.tar")
    splits = {s: {"shards": [f"{s}-000000.tar"], "count": 240} for s in ("train", "heldout")}
    (data / "manifest.json").write_text(json.dumps({"format": "ldm-shards/1", "kind": "images", "splits": splits}))
    return {"ae": d / "ae.safetensors", "text": d / "text.safetensors", "ae_other": d / "ae-other.safetensors",
            "data": data}


def _cache(files, out: Path, ae: Path, *extra: str) -> int:
    return cache_main(["--config", TINY, "--data", str(files["data"]), "--out", str(out), "--split", "train,heldout",
                       "--context", "--batch-size", "64", "--device", "cpu", *extra,
                       f"train.components.first_stage_model={ae}",
                       f"train.components.cond_stage_model={files['text']}"])


def test_cache_from_the_config_and_stage_exports(stage_exports, tmp_path, caplog, monkeypatch):
    files, out = stage_exports, tmp_path / "cache"
    assert _cache(files, out, files["ae"]) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert {k: v["count"] for k, v in man["splits"].items()} == {"train": 240, "heldout": 240}
    assert set(man["extra"]["encoders"]) == {"first_stage_model", "cond_stage_model"}
    assert man["latent_shape"] == [4, 8, 8] and man["context_shape"] == [77, 64]
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    caplog.set_level(logging.INFO)
    assert _cache(files, out, files["ae"]) == 0  # the same data and encoders: both splits kept as they are
    assert caplog.text.count("is up to date") == 2
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    caplog.clear()
    assert _cache(files, out, files["ae_other"]) == 2  # another autoencoder: refused, the cache untouched
    assert "--overwrite" in caplog.text and "encoders" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    (out / "notes.txt").write_text("mine")  # not the cache's: kept through a replacement
    with monkeypatch.context() as m:  # an --overwrite run cut off while encoding: the old cache stays whole
        def cut(*args, **kwargs):
            raise KeyboardInterrupt
        m.setattr("ldm.data.write_latent_cache", cut)
        with pytest.raises(KeyboardInterrupt):
            _cache(files, out, files["ae_other"], "--overwrite")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "notes.txt"} == stamps
    assert _cache(files, out, files["ae_other"], "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "mine" and not list(tmp_path.glob(".cache-*"))
    new = json.loads((out / "manifest.json").read_text())
    assert new["extra"]["encoders"]["first_stage_model"] != man["extra"]["encoders"]["first_stage_model"]
    assert new["extra"]["encoders"]["cond_stage_model"] == man["extra"]["encoders"]["cond_stage_model"]


def test_config_without_an_autoencoder_export_is_refused(stage_exports, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cache_main(["--config", TINY, "--data", str(stage_exports["data"]), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "train.components.first_stage_model=PATH" in err
    assert not (tmp_path / "o").exists()


def test_an_image_dataset_as_out_is_refused(stage_exports, capsys):
    data = stage_exports["data"]
    before = {p.name: p.stat().st_mtime_ns for p in data.iterdir()}
    with pytest.raises(SystemExit) as e:
        _cache(stage_exports, data, stage_exports["ae"], "--overwrite")
    assert e.value.code == 2 and "holds a dataset of kind 'images', not a latent cache" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in data.iterdir()} == before


def test_training_refuses_a_cache_of_another_autoencoder(stage_exports, tmp_path):
    files, out = stage_exports, tmp_path / "cache"
    assert _cache(files, out, files["ae"]) == 0
    common = ["--config", TINY, f"data.train={out}", "data.num_samples=null", "trainer.max_steps=1",
              f"train.components.cond_stage_model={files['text']}"]
    with pytest.raises(ValueError, match=r"data.train: the latent cache .* first_stage_model with fingerprint"):
        run([*common, "--run-dir", str(tmp_path / "other"), f"train.components.first_stage_model={files['ae_other']}"])
    trainer = run([*common, "--run-dir", str(tmp_path / "same"), f"train.components.first_stage_model={files['ae']}",
                   "data.val_split=heldout", "train.val_every_n_steps=1", "train.val_batches=1"])
    assert trainer.global_step == 1


def test_a_cache_without_recorded_encoders_is_replaced_only_with_overwrite(stage_exports, tmp_path, caplog):
    out = tmp_path / "old"
    write_latent_cache(_batches(1), lambda x: x[:, :, ::2, ::2], out, split="train")
    man = json.loads((out / "manifest.json").read_text())
    del man["extra"]  # as an older writer or a hand-made manifest may leave it
    (out / "manifest.json").write_text(json.dumps(man))
    assert _cache(stage_exports, out, stage_exports["ae"]) == 2
    assert "differs in" in caplog.text and "encoders" in caplog.text and "--overwrite" in caplog.text
    assert _cache(stage_exports, out, stage_exports["ae"], "--overwrite") == 0
    assert "encoders" in json.loads((out / "manifest.json").read_text())["extra"]


def test_a_cache_of_changed_data_is_refused_and_replaced_with_overwrite(stage_exports, tmp_path, caplog):
    """The cache recorded the data's path only: an edited caption or a new image kept the stale cache ("up to
    date"), with --overwrite too."""
    files = {**stage_exports, "data": tmp_path / "data"}
    shutil.copytree(stage_exports["data"], files["data"])
    out = tmp_path / "cache"
    assert _cache(files, out, files["ae"]) == 0
    first = (out / "manifest.json").stat().st_mtime_ns
    shard = files["data"] / "train-000000.tar"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # the shard rewritten
    caplog.clear()
    assert _cache(files, out, files["ae"]) == 2
    assert "differs in data_files" in caplog.text and "--overwrite" in caplog.text
    assert (out / "manifest.json").stat().st_mtime_ns == first
    assert _cache(files, out, files["ae"], "--overwrite") == 0
    second = (out / "manifest.json").stat().st_mtime_ns
    assert second != first
    caplog.clear()
    caplog.set_level(logging.INFO)
    assert _cache(files, out, files["ae"], "--overwrite") == 0  # unchanged since: reused
    assert caplog.text.count("is up to date") == 2 and (out / "manifest.json").stat().st_mtime_ns == second


def test_data_fingerprint_sees_edits_additions_and_removals(tmp_path):
    from ldm.data.latent_cache import data_fingerprint

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("a cat")
    (tmp_path / "a.png").write_bytes(b"x")
    fp = data_fingerprint(tmp_path)
    assert data_fingerprint(tmp_path) == fp
    (tmp_path / "sub" / "a.txt").write_text("a dog, longer")
    edited = data_fingerprint(tmp_path)
    (tmp_path / "b.png").write_bytes(b"y")
    added = data_fingerprint(tmp_path)
    (tmp_path / "b.png").unlink()
    assert len({fp, edited, added}) == 3 and data_fingerprint(tmp_path) == edited
