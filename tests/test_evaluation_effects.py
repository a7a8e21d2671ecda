"""Bad inputs to the evaluation code fail early with errors that name the input, and nothing is silently replaced:
unreadable real images, splits too small to evaluate, NaN images/features, mismatched shapes, a CLIP at another
resolution or without an image tower, a broken or moved snapshot index. CPU only, seconds."""
from __future__ import annotations

import json
import logging
import tarfile
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ldm.data.tario import ShardWriter, shard_pattern
from ldm.data.validate import split_key
from ldm.evaluation import frechet_distance, psnr, retrieval_accuracy, ssim
from ldm.inception_metrics import inception_features, kid_from_features
from script_loader import load_script

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "emoji" / "emoji32-000000.tar"


evaluate = load_script("evaluate")


def make_dataset(out: Path, n: int, garbage: int = 0) -> list[str]:
    """``n`` fixture samples as the ``heldout`` split of a manifest dataset, the first ``garbage`` of them with
    unreadable image bytes; returns the keys of the readable ones."""
    samples: dict[str, dict] = defaultdict(dict)
    with tarfile.open(FIXTURE) as tar:
        for m in tar.getmembers():
            key, ext = split_key(m.name)
            samples[key][ext] = tar.extractfile(m).read()
    keys = sorted(samples)[:n]
    for k in keys[:garbage]:
        samples[k]["png"] = b"not a png"
    out.mkdir(parents=True, exist_ok=True)
    with ShardWriter(shard_pattern(out, "heldout"), max_count=10 ** 6) as w:
        for k in keys:
            w.write({"__key__": k, **samples[k]})
    man = {"format": "ldm-shards/1", "kind": "images", "size": 32,
           "splits": {"heldout": {"shards": [Path(s).name for s in w.shards], "count": n}}}
    (out / "manifest.json").write_text(json.dumps(man), encoding="utf-8")
    return keys[garbage:]


# -- real images ------------------------------------------------------------------------------------------------


def test_unreadable_real_images_are_counted_not_replaced_by_repeats(tmp_path, caplog):
    """The loader's stream wraps around to fill a batch: an unreadable image used to be replaced by a second copy of
    another one (8 images, 7 distinct), silently."""
    readable = make_dataset(tmp_path / "ds", 8, garbage=1)
    with caplog.at_level(logging.WARNING):
        real = evaluate.real_split(str(tmp_path / "ds"), "heldout", 100, 32)
    assert len(real["caption"]) == len(real["image"]) == len(real["category"]) == len(readable) == 7
    assert len(set(real["caption"])) == 7 and len(torch.unique(real["image"].flatten(1), dim=0)) == 7
    assert "split heldout: only 7 of its 8 images could be read (skipped: not_an_image)" in caplog.text


def test_a_split_with_too_few_readable_images_fails_naming_it(tmp_path):
    make_dataset(tmp_path / "ds", 8, garbage=5)
    with pytest.raises(ValueError, match=r"split 'heldout': only 3 of its 8 images could be read \(skipped: not_an_"):
        evaluate.real_split(str(tmp_path / "ds"), "heldout", 8, 32)


def test_a_split_with_fewer_than_four_images(tmp_path, capsys):
    make_dataset(tmp_path / "ds", 3)
    with pytest.raises(ValueError, match=r"split 'heldout': holds 3 images, fewer than the 4"):
        evaluate.real_split(str(tmp_path / "ds"), "heldout", 8, 32)
    # the script refuses it from the manifest, before loading models or sampling
    for f in ("model.safetensors", "clip.safetensors"):
        (tmp_path / f).write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--model", str(tmp_path / "model.safetensors"), "--clip", str(tmp_path / "clip.safetensors"),
                       "--data", str(tmp_path / "ds"), "--splits", "heldout", "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    assert "--splits: heldout (3)" in capsys.readouterr().err and not (tmp_path / "out").exists()


# -- CLIP ------------------------------------------------------------------------------------------------------


def tiny_clip(with_visual: bool = True, image_size: int = 32):
    from ldm.conditioning.text_encoder import OpenCLIPTextEncoder

    torch.manual_seed(0)
    return OpenCLIPTextEncoder(arch=None, text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32,
                                                    "heads": 2, "layers": 2},
                               vision_cfg={"image_size": image_size, "patch_size": 8, "width": 32, "head_width": 16,
                                           "layers": 1},
                               embed_dim=16, with_visual=with_visual, freeze=True, layer="last").eval()


def test_clip_features_of_images_at_another_resolution_than_the_clip():
    """A 64 px model evaluated with a 32 px CLIP used to crash in the ViT's position embedding after all the
    sampling; the images are resized to the CLIP's input size instead (the same for real and generated ones)."""
    clip = tiny_clip(image_size=32)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
    caps = ["a", "b", "c"]
    fi, ft = evaluate.clip_features(clip, images, caps)
    small = torch.nn.functional.interpolate(images, size=(32, 32), mode="bicubic", antialias=True).clamp(-1, 1)
    fi32, ft32 = evaluate.clip_features(clip, small, caps)
    assert fi.shape == (3, 16) and torch.allclose(fi, fi32, atol=1e-6) and torch.equal(ft, ft32)


def test_a_text_only_clip_is_refused_before_sampling(monkeypatch, tmp_path):
    """A CLIP export without an image tower has an ``encode_image`` that raises RuntimeError when called: it used to
    pass the check and fail with a traceback after the sampling."""
    import ldm
    import ldm.loading

    def never(*args, **kwargs):
        raise AssertionError("sampled with a CLIP that has no image tower")

    monkeypatch.setattr(ldm, "load", lambda *args, **kwargs: SimpleNamespace(generate=never))
    monkeypatch.setattr(ldm.loading, "load_component", lambda *args, **kwargs: tiny_clip(with_visual=False))
    a = SimpleNamespace(model="m.safetensors", clip="text_only.safetensors", device="cpu", data=str(tmp_path),
                        out=str(tmp_path / "out"), splits=["heldout"], n=4, samplers=[("ddim", 2)], guidance=1.0,
                        batch_size=4, inception_weights=None, snapshots=None)
    with pytest.raises(ValueError, match=r"--clip text_only.safetensors: .* without an image encoder"):
        evaluate.run(a)


# -- snapshot index --------------------------------------------------------------------------------------------


def snapshot_run(root: Path, records: list[str]) -> Path:
    snaps = root / "snapshots"
    for step in (1, 2):
        (snaps / f"step_{step:08d}").mkdir(parents=True)
        (snaps / f"step_{step:08d}" / "model.safetensors").write_bytes(b"")
    (snaps / "index.jsonl").write_text("\n".join(records) + "\n", encoding="utf-8")
    return snaps / "index.jsonl"


def record(step: int, path: str) -> str:
    return json.dumps({"step": step, "train_s": 1.0 * step, "images": 8 * step, "path": path})


@pytest.mark.parametrize("line,message", [
    ("{not json", "index.jsonl:2 is not JSON"),
    (json.dumps({"step": 2, "path": "x"}), "index.jsonl:2 lacks train_s"),
    (record(2, "/nowhere/step_00000002/model.safetensors"), "index.jsonl:2: snapshot /nowhere/step_00000002"),
])
def test_a_broken_snapshot_index_fails_before_sampling_naming_the_line(tmp_path, capsys, line, message):
    """Each used to fail only after the main evaluation: a bare JSONDecodeError, a KeyError traceback, or a missing
    file found when its turn came."""
    index = snapshot_run(tmp_path / "run", [record(1, str(tmp_path / "run/snapshots/step_00000001/model.safetensors")),
                                            line])
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--model", str(tmp_path / "m.safetensors"), "--clip", str(tmp_path / "c.safetensors"),
                       "--data", str(tmp_path), "--splits", "heldout", "--snapshots", str(index),
                       "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and str(index.parent) in err


def test_relative_snapshot_paths_are_found_next_to_the_index(tmp_path, monkeypatch):
    """index.jsonl records the path as training saw it (relative to its working directory): from another working
    directory, or after the run folder moved, the snapshot is the step folder next to the index."""
    import ldm

    index = snapshot_run(tmp_path / "moved", [record(s, f"runs/unet/snapshots/step_{s:08d}/model.safetensors")
                                              for s in (1, 2)])
    loaded = []
    monkeypatch.setattr(ldm, "load", lambda path, **kwargs: loaded.append(path))
    monkeypatch.setattr(evaluate, "evaluate_model", lambda *args: {})
    curve = evaluate.evaluate_snapshots(index, None, {}, [("ddim", 2)], None, "cpu")
    assert loaded == [str(index.parent / f"step_{s:08d}" / "model.safetensors") for s in (1, 2)]
    assert [c["step"] for c in curve] == [1, 2]


# -- metric functions ------------------------------------------------------------------------------------------


def test_non_finite_features_are_named_not_a_linear_algebra_error():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(10, 4, generator=g), torch.randn(12, 4, generator=g)
    b[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"b: 1 of 12 rows hold NaN or inf values \(rows \[3\]\)"):
        frechet_distance(a, b)
    with pytest.raises(ValueError, match=r"a: 1 of 12 rows"):
        frechet_distance(b, a)
    with pytest.raises(ValueError, match=r"b: 1 of 12 rows"):
        kid_from_features(a, b, subset_size=5)


class _MeanColour(torch.nn.Module):
    """A stand-in feature network: the mean colour of uint8 images (B, 3, H, W) -> (B, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.uint8
        return x.float().mean((2, 3)) * self.w


def test_nan_images_are_refused_not_turned_black():
    """NaN pixels used to become 0 in the uint8 conversion: black pixels and a finite, wrong FID/KID."""
    images = torch.zeros(4, 3, 8, 8)
    assert inception_features(_MeanColour(), images).tolist() == [[128.0] * 3] * 4  # round(127.5), half to even
    images[2, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"images: 1 of 4 rows hold NaN"):
        inception_features(_MeanColour(), images)


@pytest.mark.parametrize("fn", [psnr, ssim])
def test_psnr_and_ssim_refuse_mismatched_shapes(fn):
    x = torch.rand(4, 3, 16, 16)
    with pytest.raises(ValueError, match=rf"{fn.__name__}: x and y must have the same shape"):
        fn(x, x[:1])  # used to broadcast one image against four
    with pytest.raises(ValueError, match=rf"{fn.__name__}: x and y must have the same shape"):
        fn(x, x[0])


def test_ssim_of_images_smaller_than_its_window():
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"ssim: images of \(8, 8\) pixels are smaller than the 11×11 window"):
        ssim(x, x)
    assert ssim(x, x, window=7).tolist() == pytest.approx([1.0, 1.0])


def test_retrieval_accuracy_refuses_unpaired_features():
    with pytest.raises(ValueError, match=r"got \(5, 4\) and \(7, 4\)"):
        retrieval_accuracy(torch.randn(5, 4), torch.randn(7, 4))  # used to rank 5 images among 7 captions


def test_unreadable_images_are_reported_when_n_is_drawn_from_the_rest(tmp_path, caplog):
    make_dataset(tmp_path / "ds", 8, garbage=1)
    with caplog.at_level(logging.WARNING):
        real = evaluate.real_split(str(tmp_path / "ds"), "heldout", 5, 32)
    assert len(set(real["caption"])) == len(real["image"]) == 5
    assert "split heldout: some images could not be read (skipped: not_an_image); drew 5 readable ones" in caplog.text


def test_split_metrics_score_an_identical_caption_as_retrieved(monkeypatch, caplog):
    """Two images of a split share a caption (the emoji data set's hidden legacy icons repeat the captions of their
    spelled-out copies): retrieving the identical caption counted as a miss in every retrieval metric."""
    captions = ["cat, flat emoji", "cat, flat emoji", "dog, flat emoji", "owl, flat emoji", "fox, flat emoji"]
    texts = torch.eye(5)[[0, 0, 1, 2, 3]]  # (5, 5): the same caption, the same text features
    monkeypatch.setattr(evaluate, "clip_features", lambda clip, images, caps: (texts.clone(), texts.clone()))
    real = {"image": torch.zeros(5, 3, 8, 8), "caption": captions, "category": ["Other"] * 5}
    m = evaluate.split_metrics(None, real, torch.zeros(5, 3, 8, 8))
    assert m["retrieval@1"] == m["real_retrieval@1"] == 1.0
    with caplog.at_level(logging.INFO, logger="ldm.evaluate"):
        assert evaluate.log_repeated_captions("heldout", captions) == 4
    assert "split heldout: 2 of 5 images share their caption with another image" in caplog.text
