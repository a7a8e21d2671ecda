"""scripts/sample.py: every sampling flag changes what it should (and only that), img2img / inpainting inputs are
used as given, and a later run into the same folder keeps the earlier images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ldm
from ldm.checkpoint import save_safetensors
from ldm.cli.sample import run
from ldm.lora import add_lora, lora_state_dict

TINY = "configs/tiny/txt2img.yaml"


def _wake(model: torch.nn.Module, seed: int) -> None:
    """Give the zero-initialised layers (output convolutions, biases) values: an untrained model predicts ε = 0,
    so prompts, guidance and steps would change nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny model whose prompts matter, a LoRA of ours for it, another autoencoder, and a 64x48 init image."""
    d = tmp_path_factory.mktemp("cli_effects")
    torch.manual_seed(0)
    model = ldm.load(config=TINY)
    _wake(model, 0)
    out = {"ckpt": ldm.save(model, d / "tiny.safetensors")}
    add_lora(model.model, rank=2, targets=["to_q", "to_v"])
    _wake(model.model, 1)  # the adapters' B matrices start at zero
    out["lora"] = save_safetensors({f"model.{k}": v for k, v in lora_state_dict(model.model).items()},
                                   d / "lora.safetensors")
    torch.manual_seed(1)
    out["vae"] = save_safetensors(dict(ldm.load(config=TINY).first_stage_model.state_dict()), d / "vae.safetensors")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(d / "in.png")
    out["init"] = d / "in.png"
    return out


def _sample(files: dict[str, Path], out: Path, *flags: str) -> list[np.ndarray]:
    paths = run(["--checkpoint", str(files["ckpt"]), "--prompt", "cat face", "--steps", "3", "--dtype", "fp32",
                 "--device", "cpu", "--out", str(out), *[f.format(**{k: str(v) for k, v in files.items()})
                                                          for f in flags]])
    return [np.asarray(Image.open(p), dtype=np.int16) for p in paths]


@pytest.fixture(scope="module")
def base(files, tmp_path_factory) -> np.ndarray:
    return _sample(files, tmp_path_factory.mktemp("base"))[0]


def test_the_same_flags_give_the_same_image(files, base, tmp_path):
    assert np.array_equal(_sample(files, tmp_path)[0], base)


@pytest.mark.parametrize("flags", [
    ["--seed", "5"], ["--negative-prompt", "blurry"], ["--steps", "5"], ["--guidance", "2"],
    ["--sampler", "euler"], ["--clip-skip", "2"], ["--vae", "{vae}"], ["--lora", "{lora}"],
    ["--lora", "{lora}", "--lora-scale", "0.5"], ["--guidance-rescale", "1"],
], ids=lambda f: " ".join(f).replace("{", "").replace("}", ""))
def test_each_flag_changes_the_image(files, base, tmp_path, flags):
    img = _sample(files, tmp_path, *flags)[0]
    assert img.shape == base.shape and np.abs(img - base).max() > 2, flags  # 8-bit pixels


def test_lora_scale_zero_is_the_model_without_the_lora(files, base, tmp_path):
    assert np.array_equal(_sample(files, tmp_path, "--lora", "{lora}", "--lora-scale", "0")[0], base)


def test_height_and_width_set_the_size(files, tmp_path):
    assert _sample(files, tmp_path, "--height", "40", "--width", "56")[0].shape == (40, 56, 3)


def test_n_images_per_prompt_seeded_alone_whatever_the_batch(files, base, tmp_path):
    """Image i of a run is seed + i (as its metadata says): the same pixels in batches of 2 or 1, and --seed s+i
    alone reproduces it."""
    a = _sample(files, tmp_path / "a", "--n", "3", "--batch-size", "2")
    b = _sample(files, tmp_path / "b", "--n", "3", "--batch-size", "1")
    close = lambda x, y: np.abs(x - y).max() <= 2  # noqa: E731 (batched float32 sums round differently)
    assert len(a) == 3 and all(close(x, y) for x, y in zip(a, b))
    assert close(a[0], base) and np.abs(a[1] - a[0]).max() > 8
    assert close(_sample(files, tmp_path / "c", "--seed", "2")[0], a[2])
    assert "Seed: 2," in Image.open(tmp_path / "a" / "00002-2.png").text["parameters"]


def test_img2img_samples_at_the_init_images_size(files, tmp_path):
    """Without --height/--width the output has the init image's size (64x48; was the model's 32x32, the image
    squeezed to a square); given, they win."""
    assert _sample(files, tmp_path / "a", "--init-image", "{init}")[0].shape == (48, 64, 3)
    assert _sample(files, tmp_path / "b", "--init-image", "{init}", "--height", "32")[0].shape == (32, 64, 3)


def test_strength_changes_img2img(files, tmp_path):
    a = _sample(files, tmp_path / "a", "--init-image", "{init}", "--strength", "0.3")[0]
    b = _sample(files, tmp_path / "b", "--init-image", "{init}", "--strength", "1")[0]
    assert np.abs(a - b).max() > 8
    assert "Denoising strength: 0.3" in Image.open(tmp_path / "a" / "00000-0.png").text["parameters"]


def test_init_image_changes_the_image(files, tmp_path):
    other = tmp_path / "other.png"
    Image.new("RGB", (64, 48), "blue").save(other)
    a = _sample(files, tmp_path / "a", "--init-image", "{init}", "--strength", "0.5")[0]
    b = _sample(files, tmp_path / "b", "--init-image", str(other), "--strength", "0.5")[0]
    assert np.abs(a - b).max() > 8


def test_white_in_the_mask_is_repainted_black_kept(files, tmp_path, monkeypatch):
    """With the decoder replaced by a pixel view of the latents, the black half of the mask is the init image's
    latents exactly, the white half is new; a mask of half the size (same aspect) marks the same halves, and so does
    a mask with transparency by its alpha channel (opaque = repaint, as the web UIs read it)."""
    import ldm.pipeline

    monkeypatch.setattr(ldm.pipeline, "decode_latents", lambda vae, z: torch.nn.functional.interpolate(
        torch.sigmoid(z[:, :3].float()), scale_factor=vae.downsample_factor, mode="nearest"))
    masks = {}
    for name, size in (("black", (64, 48)), ("left", (64, 48)), ("small", (32, 24))):
        m = np.zeros(size[::-1], np.uint8)
        if name != "black":
            m[:, : size[0] // 2] = 255
        Image.fromarray(m).save(tmp_path / f"{name}.png")
    alpha = np.full((48, 64, 4), 255, np.uint8)  # white everywhere, opaque on the left: painted over transparency
    alpha[:, 32:, 3] = 0
    Image.fromarray(alpha, "RGBA").save(tmp_path / "alpha.png")
    for name in ("black", "left", "small", "alpha"):
        masks[name] = _sample(files, tmp_path / name, "--init-image", "{init}", "--mask", str(tmp_path / f"{name}.png"),
                              "--strength", "1")[0]
    kept, left = masks["black"], masks["left"]
    assert np.array_equal(left[:, 32:], kept[:, 32:])  # black: the source latents
    assert np.abs(left[:, :32] - kept[:, :32]).mean() > 4  # white: repainted
    assert np.array_equal(masks["small"], left)
    assert np.array_equal(masks["alpha"], left)  # was all repainted: the transparent part is white


def test_a_second_run_into_the_same_folder_keeps_the_first_runs_images(files, tmp_path):
    """Both runs wrote 00000-0.png and grid.png: the second replaced the first's images without a word."""
    first = _sample(files, tmp_path, "--n", "2")
    second = _sample(files, tmp_path, "--n", "2", "--seed", "9")
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["00000-0.png", "00001-1.png", "00002-9.png", "00003-10.png", "grid-00002.png", "grid.png"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "00000-0.png"), dtype=np.int16), first[0])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "00003-10.png"), dtype=np.int16), second[1])
