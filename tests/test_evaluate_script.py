"""scripts/evaluate.py end to end on the CPU: a tiny U-Net (with training snapshots) and a tiny CLIP trained once on a
copy of the committed emoji fixture split into train/heldout/style_transfer_eval shards with a manifest that has
``category_by_key``; then metrics.json (per split and sampler, by style and category), grids, curve.json, FID/KID
with a randomly initialised Inception file (nothing can be downloaded here), and a missing ``--snapshots`` file.
"""
from __future__ import annotations

import json
import math
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from PIL import Image

from ldm.cli.train import run
from ldm.data.tario import ShardWriter, shard_pattern
from ldm.data.validate import split_key
from script_loader import load_script

pytestmark = pytest.mark.usefixtures("no_downloads")  # tests/conftest.py

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "emoji" / "emoji32-000000.tar"
SPLITS = ("train", "heldout", "style_transfer_eval")
SAMPLERS = ["ddim:2", "euler:2"]  # the first one gives the split metrics of every split and the snapshot curve
N_MAIN = 32  # heldout has 33 samples in the fixture: both styles (> 8) and one category (> 16) are broken out
N_FID = 8  # style_transfer_eval has only 8: every split of the FID run can fill one batch of 8


evaluate = load_script("evaluate")


def category_of(split: str, i: int) -> str | None:
    """Made-up Unicode categories by position among the split's sorted keys; None: left out of the manifest
    (evaluate.py files those under "Other"). Heldout: 24 × "Smileys & Emotion" (> 16 in any 32 of its 33),
    6 × "Symbols", 3 unlisted; train: three of four "Objects", the rest "Flags"."""
    if split == "heldout":
        return "Smileys & Emotion" if i < 24 else "Symbols" if i < 30 else None
    if split == "train":
        return "Flags" if i % 4 == 0 else "Objects"
    return "Activities"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """The fixture's 240 renders as a prepared dataset: one shard per split (by each sample's ``split`` metadata)
    and manifest.json with ``splits`` and ``category_by_key``, like scripts/prepare_data.py writes."""
    out = tmp_path_factory.mktemp("emoji32")
    samples: dict[str, dict] = defaultdict(dict)
    with tarfile.open(FIXTURE) as tar:
        for m in tar.getmembers():
            key, ext = split_key(m.name)
            samples[key][ext] = tar.extractfile(m).read()
    by_split: dict[str, list[str]] = defaultdict(list)
    for key, s in samples.items():
        by_split[json.loads(s["json"])["split"]].append(key)
    assert sorted(by_split) == sorted(SPLITS)
    assert len(by_split["heldout"]) == 33 and len(by_split["style_transfer_eval"]) == 8  # what the sizes assume
    man = {"format": "ldm-shards/1", "kind": "images", "dataset": "emoji-fixture", "size": 32,
           "category_by_key": {}, "splits": {}}
    for sp in SPLITS:
        keys = sorted(by_split[sp])
        with ShardWriter(shard_pattern(out, sp), max_count=10 ** 6) as w:
            for i, key in enumerate(keys):
                w.write({"__key__": key, **samples[key]})
                if (c := category_of(sp, i)) is not None:
                    man["category_by_key"][key] = c
        styles = Counter(json.loads(samples[k]["json"])["style"] for k in keys)
        man["splits"][sp] = {"shards": [Path(s).name for s in w.shards], "count": sum(w.counts),
                             "by_style": {st: styles[st] for st in ("noto", "fluent")}}
    (out / "manifest.json").write_text(json.dumps(man, indent=1), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset) -> dict[str, Path]:
    """A 2-step tiny U-Net with a snapshot per step and a 2-step tiny CLIP, both on the train split."""
    runs = tmp_path_factory.mktemp("runs")
    data = [f"data.train={dataset}", "data.num_samples=null"]
    run(["--config", str(ROOT / "configs" / "tiny" / "txt2img.yaml"), "--run-dir", str(runs / "unet"), *data,
         "trainer.max_steps=2", "train.snapshot_every_min=0.0001"])
    run(["--config", str(ROOT / "configs" / "tiny" / "clip.yaml"), "--run-dir", str(runs / "clip"), *data,
         "trainer.max_steps=2"])
    return {"model": runs / "unet" / "model.safetensors", "clip": runs / "clip" / "model.safetensors",
            "index": runs / "unet" / "snapshots" / "index.jsonl"}


def _args(trained: dict, dataset: Path, out: Path, splits: str, n: int, *extra: str) -> list[str]:
    return ["--model", str(trained["model"]), "--clip", str(trained["clip"]), "--data", str(dataset),
            "--splits", splits, "--n", str(n), "--samplers", ",".join(SAMPLERS), "--guidance", "3.0",
            "--out", str(out), "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def plain(tmp_path_factory, trained, dataset) -> Path:
    """Without Inception weights, with the snapshot curve; batch 16 < n so sampling goes in several batches."""
    out = tmp_path_factory.mktemp("eval_plain")
    assert evaluate.main(_args(trained, dataset, out, "heldout,train", N_MAIN, "--batch-size", "16",
                               "--snapshots", str(trained["index"]))) == 0
    return out


@pytest.fixture(scope="module")
def with_fid(tmp_path_factory, trained, dataset, inception_weights) -> Path:
    out = tmp_path_factory.mktemp("eval_fid")
    assert evaluate.main(_args(trained, dataset, out, ",".join(SPLITS), N_FID,
                               "--inception-weights", inception_weights)) == 0
    return out


def expected_groups(dataset: Path, split: str, n: int) -> dict[str, int]:
    """``{group: size}`` of the groups evaluate.py must break out for the real images it draws: styles with more
    than 8 samples, categories (manifest, else "Other") with more than 16."""
    real = evaluate.real_split(str(dataset), split, n, 32)
    assert len(real["caption"]) == n
    styles = Counter("fluent" if c.endswith("fluent emoji") else "noto" for c in real["caption"])
    cats = Counter(f"category:{c}" for c in real["category"])
    return {**{g: k for g, k in styles.items() if k > 8}, **{g: k for g, k in cats.items() if k > 16}}


SPLIT_KEYS = {"n", "fd_clip", "retrieval@1", "retrieval@5", "real_retrieval@1", "real_retrieval@5",
              "fd_clip_real_halves", "fd_clip_gen_vs_real_half", "sample_s"}
GROUP_SUFFIXES = ("n", "fd_clip", "retrieval@1", "real_retrieval@1")
INCEPTION_KEYS = {"fid", "kid", "kid_std", "fid_real_halves"}
REAL_ONLY = ("real_retrieval@1", "real_retrieval@5", "fd_clip_real_halves")  # depend on the real images only


def check_split(m: dict, n: int, groups: dict[str, int], inception: bool) -> None:
    keys = SPLIT_KEYS | {f"{g}/{s}" for g in groups for s in GROUP_SUFFIXES} | (INCEPTION_KEYS if inception else set())
    assert set(m) == keys
    assert m["n"] == n and all(m[f"{g}/n"] == k for g, k in groups.items())
    for k, v in m.items():
        assert isinstance(v, (int, float)) and math.isfinite(v), (k, v)
        if "retrieval@" in k:
            assert 0.0 <= v <= 1.0, (k, v)
        if "fd_clip" in k:
            assert v >= -1e-6, (k, v)  # a Fréchet distance, up to rounding
    assert m["sample_s"] > 0
    assert m["fd_clip_gen_vs_real_half"] > 0 and m["fd_clip"] > 0  # a 2-step model is far from the data
    if inception:
        assert m["fid"] > 0 and m["fid_real_halves"] > 0
        assert m["kid_std"] == 0.0  # subsets of min(100, 8, 8) = all 8 images: one value


def test_metrics_json(plain, dataset, trained):
    res = json.loads((plain / "metrics.json").read_text())
    runs = [f"heldout/{s}" for s in SAMPLERS] + [f"train/{SAMPLERS[0]}"]  # other splits: the first sampler only
    assert set(res) == {"model", "clip", "n_requested", "n_by_split", "guidance", "fid", "autoencoder_heldout", *runs}
    assert res["model"] == str(trained["model"]) and res["clip"] == str(trained["clip"])
    assert res["n_requested"] == N_MAIN and res["guidance"] == 3.0
    assert res["n_by_split"] == {"heldout": N_MAIN, "train": N_MAIN}
    assert res["fid"].startswith("absent") and "--inception-weights" in res["fid"]
    for split in ("heldout", "train"):
        groups = expected_groups(dataset, split, N_MAIN)
        for r in runs:
            if r.startswith(split + "/"):
                check_split(res[r], N_MAIN, groups, inception=False)
    held = expected_groups(dataset, "heldout", N_MAIN)
    assert {"noto", "fluent", "category:Smileys & Emotion"} <= set(held)  # the breakdowns are exercised
    assert not {"category:Symbols", "category:Other"} & set(held)  # 6 and 3 samples: too few
    # the same real images for every sampler: identical real-only numbers, generated ones differ
    a, b = (res[f"heldout/{s}"] for s in SAMPLERS)
    real_keys = [k for k in a if k.endswith(REAL_ONLY)]
    assert len(real_keys) == len(REAL_ONLY) + len(held) and all(a[k] == b[k] for k in real_keys)
    assert a["fd_clip"] != b["fd_clip"]
    ae = res["autoencoder_heldout"]
    assert set(ae) == {"psnr", "ssim"} and all(math.isfinite(v) for v in ae.values())
    assert ae["psnr"] > 0 and -1.0 <= ae["ssim"] <= 1.0


def test_grids(plain):
    assert sorted(p.name for p in plain.glob("*.png")) == ["grid_heldout.png", "grid_train.png"]
    for p in plain.glob("*.png"):
        with Image.open(p) as im:
            assert im.format == "PNG"
            im.verify()
        with Image.open(p) as im:
            im.load()
            assert im.width >= 8 * 96 and im.height >= 4 * 96  # 16 generated + 16 real, 8 per row, 96 px each


def test_curve(plain, trained):
    index = [json.loads(line) for line in trained["index"].read_text().splitlines()]
    curve = json.loads((plain / "curve.json").read_text())
    assert [r["step"] for r in index] == [1, 2]
    assert len(curve) == len(index)
    main_res = json.loads((plain / "metrics.json").read_text())
    first = f"heldout/{SAMPLERS[0]}"
    for rec, point in zip(index, curve):
        assert {k: point[k] for k in rec} == rec  # the index record, plus the metrics
        assert set(point["metrics"]) == {first, "autoencoder_heldout"}  # held-out split, first sampler, no grids
        m = point["metrics"][first]
        assert m["n"] == N_MAIN and all(m[k] == main_res[first][k] for k in REAL_ONLY)
        assert all(math.isfinite(v) for v in m.values()) and 0 <= m["retrieval@1"] <= 1
    # the last snapshot is the exported model: the same numbers as the main evaluation (same seeds, same reals)
    last, final = curve[-1]["metrics"], main_res
    assert {k: v for k, v in last[first].items() if k != "sample_s"} == pytest.approx(
        {k: v for k, v in final[first].items() if k != "sample_s"}, rel=1e-5, abs=1e-6)
    assert last["autoencoder_heldout"] == pytest.approx(final["autoencoder_heldout"], rel=1e-6)


def test_fid_and_kid_with_local_inception_weights(with_fid, dataset, inception_weights):
    res = json.loads((with_fid / "metrics.json").read_text())
    runs = [f"heldout/{s}" for s in SAMPLERS] + [f"{sp}/{SAMPLERS[0]}" for sp in ("style_transfer_eval", "train")]
    assert set(res) == {"model", "clip", "n_requested", "n_by_split", "guidance", "inception_weights",
                        "autoencoder_heldout", *runs}
    assert res["inception_weights"] == inception_weights and "fid" not in res
    for r in runs:
        check_split(res[r], N_FID, expected_groups(dataset, r.split("/")[0], N_FID), inception=True)
    a, b = (res[f"heldout/{s}"] for s in SAMPLERS)
    assert a["fid_real_halves"] == b["fid_real_halves"] and a["fid"] != b["fid"]
    assert sorted(p.name for p in with_fid.glob("*.png")) == [f"grid_{sp}.png" for sp in sorted(SPLITS)]
    assert not (with_fid / "curve.json").exists()


@pytest.mark.parametrize("change,message", [
    (("--snapshots", "{tmp}/nowhere/index.jsonl"), "{tmp}/nowhere/index.jsonl not found"),
    (("--splits", "train", "--snapshots", "{index}"), "add heldout to --splits"),
    (("--n", "3"), "at least 4 images"),
    (("--inception-weights", "{tmp}/no.pth"), "{tmp}/no.pth not found"),
])
def test_bad_arguments_fail_before_sampling(tmp_path, trained, dataset, capsys, change, message):
    fill = {"tmp": str(tmp_path), "index": str(trained["index"])}
    args = _args(trained, dataset, tmp_path / "out", "heldout", 4) + [c.format(**fill) for c in change]
    with pytest.raises(SystemExit) as e:
        evaluate.main(args)
    assert e.value.code == 2 and message.format(**fill) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing sampled or written


def test_a_split_smaller_than_n_is_evaluated_whole(trained, dataset):
    real = evaluate.real_split(str(dataset), "style_transfer_eval", 500, 32)
    assert len(real["caption"]) == len(real["image"]) == len(real["category"]) == N_FID  # all 8, no crash
