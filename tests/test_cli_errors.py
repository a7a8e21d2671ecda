"""Bad input to the command-line scripts: one line naming the file or argument, exit status 2 (convert.py: 1), no
traceback, checked before any model loads where possible, and nothing half-written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import ldm
from ldm.checkpoint import save_safetensors
from ldm.cli.sample import main as sample_main
from script_loader import load_script



_script = load_script


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny text-to-image model, an autoencoder-only and a CLIP-only export (as the tiny stage configs save them),
    a LoRA in kohya's layout, a web UI textual-inversion .pt, an embedding of the wrong width and a non-image."""
    d = tmp_path_factory.mktemp("cli_errors")
    torch.manual_seed(0)
    out = {"t2i": ldm.save(ldm.load(config="configs/tiny/txt2img.yaml"), d / "t2i.safetensors"),
           "ae": ldm.save(ldm.load(config="configs/tiny/autoencoder.yaml"), d / "ae.safetensors"),
           "clip": ldm.save(ldm.load(config="configs/tiny/clip.yaml"), d / "clip.safetensors")}
    out["kohya"] = save_safetensors({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, d / "kohya.safetensors")
    out["wide"] = save_safetensors({"emb_params": torch.randn(2, 17)}, d / "wide.safetensors")
    torch.save({"string_to_param": {"*": torch.randn(2, 64)}, "name": "tok"}, d / "tok.pt")
    out["ti"] = d / "tok.pt"
    (d / "notimg.png").write_bytes(b"\x89PNG not really")
    out["notimg"] = d / "notimg.png"
    Image.new("RGB", (32, 32), "red").save(d / "red.png")
    out["img"] = d / "red.png"
    (d / "afile").write_text("x")
    out["file"] = d / "afile"
    Image.new("L", (64, 32), 255).save(d / "wide_mask.png")
    out["wide_mask"] = d / "wide_mask.png"
    (d / "prompts_latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    out["latin1"] = d / "prompts_latin1.txt"
    return out


def _no_load(monkeypatch):
    monkeypatch.setattr(ldm, "load", lambda *a, **k: pytest.fail("model loaded before the arguments were checked"))


def _one_line_error(caplog, capsys, *words: str) -> None:
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert all(w in errors[0] for w in words), errors[0]
    assert "Traceback" not in capsys.readouterr().err


# ---- scripts/sample.py (ldm.cli.sample) -------------------------------------------------------------------------

@pytest.mark.parametrize("extra, words", [
    (["--vae", "{clip}"], ["--vae", "text encoder", "not an autoencoder"]),
    (["--config", "configs/tiny/autoencoder.yaml"], ["--config", "autoencoder", "not a text-to-image model"]),
    (["--init-image", "{notimg}"], ["--init-image", "notimg.png", "not an image"]),
    (["--init-image", "{img}", "--mask", "{notimg}"], ["--mask", "notimg.png", "not an image"]),
    (["--device", "foo"], ["--device foo: not a torch device"]),
    (["--out", "{file}"], ["--out", "not a folder"]),
    (["--out", "{file}/sub"], ["--out", "is a file"]),
    # these four went through before: a stretched mask, a --strength with no effect, a traceback-free but unnamed
    # UnicodeDecodeError, and a seed torch's generator overflowed on after the model had loaded
    (["--init-image", "{img}", "--mask", "{wide_mask}"], ["--mask", "wide_mask.png", "64x32", "32x32", "aspect"]),
    (["--strength", "0.5"], ["--strength", "needs --init-image"]),
    (["--prompts-file", "{latin1}"], ["--prompts-file", "prompts_latin1.txt", "not UTF-8"]),
    (["--seed", str(2 ** 64)], ["--seed must be below 2**62"]),
])
def test_sample_bad_input_before_loading(files, tmp_path, caplog, capsys, monkeypatch, extra, words):
    _no_load(monkeypatch)
    extra = [e.format(**{k: str(v) for k, v in files.items()}) for e in extra]
    rc = sample_main(["--checkpoint", str(files["t2i"]), "--prompt", "x", "--out", str(tmp_path / "o"), *extra])
    assert rc == 2
    _one_line_error(caplog, capsys, *words)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind, words", [("ae", ["autoencoder", "not a text-to-image model"]),
                                         ("clip", ["text encoder", "not a text-to-image model"])])
def test_sample_refuses_a_component_export_as_checkpoint(files, tmp_path, caplog, capsys, monkeypatch, kind, words):
    _no_load(monkeypatch)
    rc = sample_main(["--checkpoint", str(files[kind]), "--prompt", "x", "--out", str(tmp_path)])
    assert rc == 2
    _one_line_error(caplog, capsys, "--checkpoint", *words)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_sample_cuda_device_without_gpu(files, tmp_path, caplog, capsys, monkeypatch):
    _no_load(monkeypatch)
    rc = sample_main(["--checkpoint", str(files["t2i"]), "--prompt", "x", "--out", str(tmp_path), "--device", "cuda"])
    assert rc == 2
    _one_line_error(caplog, capsys, "--device cuda: no CUDA device is available")


@pytest.mark.parametrize("extra, words", [
    (["--lora", "{t2i}"], ["t2i.safetensors", "LoRA"]),
    (["--embedding", "{wide}"], ["wide.safetensors", "width"]),
])
def test_sample_library_errors_are_one_line(files, tmp_path, caplog, capsys, extra, words):
    """CheckpointError from ldm.load (a RuntimeError) is reported like a ValueError."""
    extra = [e.format(**{k: str(v) for k, v in files.items()}) for e in extra]
    rc = sample_main(["--checkpoint", str(files["t2i"]), "--prompt", "x", "--steps", "1", "--out", str(tmp_path / "o"),
                      "--device", "cpu", *extra])
    assert rc == 2
    _one_line_error(caplog, capsys, *words)


def test_sample_vae_takes_the_autoencoder_of_a_text_to_image_file(files, tmp_path):
    """--vae with a whole model of ours (its first_stage_model is used), as ldm.load(vae=...) and convert.py merge
    --vae take it; it was refused as "not an autoencoder"."""
    rc = sample_main(["--checkpoint", str(files["t2i"]), "--prompt", "x", "--steps", "1", "--out", str(tmp_path),
                      "--device", "cpu", "--dtype", "fp32", "--vae", str(files["t2i"])])
    assert rc == 0 and list(tmp_path.glob("*.png"))


def test_sample_cuda_graph_on_cpu_warns(files, tmp_path, caplog):
    rc = sample_main(["--checkpoint", str(files["t2i"]), "--prompt", "x", "--steps", "1", "--out", str(tmp_path),
                      "--device", "cpu", "--dtype", "fp32", "--cuda-graph"])
    assert rc == 0
    assert any(r.levelname == "WARNING" and "--cuda-graph" in r.getMessage() and "no effect" in r.getMessage()
               for r in caplog.records)


def test_sample_img2img_from_files(files, tmp_path):
    rc = sample_main(["--checkpoint", str(files["t2i"]), "--prompt", "x", "--steps", "1", "--out", str(tmp_path),
                      "--device", "cpu", "--dtype", "fp32", "--init-image", str(files["img"]), "--strength", "0.5"])
    assert rc == 0 and (tmp_path / "00000-0.png").is_file()


# ---- ldm.generate / pipeline_io ----------------------------------------------------------------------------------

def test_pipeline_io_accepts_paths_and_names_bad_types(files):
    from ldm.pipeline_io import to_image_tensor, to_mask_tensor

    t = to_image_tensor(str(files["img"]), 2, 16, 16)
    assert t.shape == (2, 3, 16, 16) and torch.allclose(t[:, 0], torch.ones(2, 16, 16))
    assert to_mask_tensor(files["img"], 1, 8, 8).shape == (1, 1, 8, 8)  # a Path
    with pytest.raises(TypeError, match="init_image must be a PIL image, an image file path"):
        to_image_tensor(3, 1, 8, 8)
    with pytest.raises(TypeError, match="mask must be"):
        to_mask_tensor(b"bytes", 1, 8, 8)
    with pytest.raises(ValueError, match="notimg.png"):
        to_image_tensor(str(files["notimg"]), 1, 8, 8)
    with pytest.raises(FileNotFoundError, match="init_image"):
        to_image_tensor("missing.png", 1, 8, 8)


def test_generate_takes_an_image_path(files):
    model = ldm.load(files["t2i"])
    ims = model.generate(["x"], steps=1, init_image=str(files["img"]), strength=0.5, progress=False)
    assert len(ims) == 1


# ---- scripts/convert.py ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def convert():
    return _script("convert")


def test_convert_refuses_nested_tensors_and_writes_nothing(convert, files, tmp_path, caplog):
    out = tmp_path / "o.safetensors"
    assert convert.main(["to-safetensors", str(files["ti"]), str(out)]) == 2
    assert "textual-inversion" in caplog.text and "nothing written" in caplog.text and not out.exists()
    torch.save({"a": {"b": torch.zeros(1)}}, tmp_path / "n.pt")
    assert convert.main(["to-safetensors", str(tmp_path / "n.pt"), str(out)]) == 2
    assert "'a.b'" in caplog.text and not out.exists()


def test_convert_to_diffusers_bad_input(convert, files, tmp_path, caplog, monkeypatch):
    _no_load(monkeypatch)
    assert convert.main(["to-diffusers", str(files["ae"]), str(tmp_path / "d")]) == 2
    assert "autoencoder" in caplog.text and "not a text-to-image model" in caplog.text
    assert convert.main(["to-diffusers", str(files["t2i"]), str(files["file"])]) == 2
    assert "is an existing file, not a folder" in caplog.text
    assert not (tmp_path / "d").exists()


def test_convert_lora_to_kohya_on_a_kohya_file(convert, files, tmp_path, caplog):
    assert convert.main(["lora-to-kohya", str(files["kohya"]), str(tmp_path / "k.safetensors")]) == 2
    assert "already in kohya-ss's layout" in caplog.text and not (tmp_path / "k.safetensors").exists()


# ---- scripts/cache_latents.py and scripts/evaluate.py -------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    (d / "manifest.json").write_text(json.dumps({"splits": {"train": {"shards": [], "count": 8},
                                                            "heldout": {"shards": [], "count": 8}}}))
    return d


def _argparse_error(capsys, fn, *words):
    with pytest.raises(SystemExit) as e:
        fn()
    err = capsys.readouterr().err
    assert e.value.code == 2 and all(w in err for w in words), err
    assert "Traceback" not in err


@pytest.mark.parametrize("extra, words", [
    (["--split", "foo"], ["--split foo", "has heldout, train"]),
    (["--data", "{tmp}/nowhere"], ["--data", "nowhere not found"]),
    (["--model", "{ae}"], ["--model", "autoencoder", "not a text-to-image model"]),
    (["--device", "foo"], ["--device foo"]),
])
def test_cache_latents_bad_input(files, data, tmp_path, capsys, monkeypatch, extra, words):
    _no_load(monkeypatch)
    cache = _script("cache_latents")
    fill = {"tmp": str(tmp_path), **{k: str(v) for k, v in files.items()}}
    args = ["--model", str(files["t2i"]), "--data", str(data), "--out", str(tmp_path / "o"),
            *[e.format(**fill) for e in extra]]
    _argparse_error(capsys, lambda: cache.main(args), *words)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra, words", [
    (["--samplers", "foo:2"], ["argument --samplers", "unknown sampler 'foo'"]),
    (["--samplers", "dpmpp_2m"], ["argument --samplers", "no step count", "name:steps"]),
    (["--samplers", "dpmpp_2m:abc"], ["argument --samplers", "positive integer"]),
    (["--splits", "foo"], ["--splits", "foo not in", "has heldout, train"]),
    (["--clip", "{t2i}"], ["--clip", "text-to-image model", "not a CLIP export"]),
    (["--model", "{clip}"], ["--model", "not a text-to-image model"]),
])
def test_evaluate_bad_input(files, data, tmp_path, capsys, monkeypatch, extra, words):
    _no_load(monkeypatch)
    evaluate = _script("evaluate")
    fill = {k: str(v) for k, v in files.items()}
    args = ["--model", str(files["t2i"]), "--clip", str(files["clip"]), "--data", str(data), "--splits", "heldout",
            "--n", "4", "--out", str(tmp_path / "o"), "--device", "cpu", *[e.format(**fill) for e in extra]]
    _argparse_error(capsys, lambda: evaluate.main(args), *words)
    assert not (tmp_path / "o").exists()
