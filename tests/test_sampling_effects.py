"""Sampling options reach the math they claim to change, with the value the user gave.

The training code had options that were accepted and silently did nothing; these are the checks for the sampling
path: a recorded CUDA graph of the text encoder that must not outlive a CLIP-skip change, guidance and guidance
rescale through ``generate`` against a hand-written reference, and every ``scripts/sample.py`` flag arriving at
``ldm.load`` / ``generate`` unchanged.
"""
from __future__ import annotations

import pytest
import torch
from PIL import Image

import ldm
from ldm.addons import set_clip_skip
from ldm.cli.sample import main
from ldm.fast import optimize
from tiny_model import tiny_with_signal

TINY = "configs/tiny/txt2img.yaml"


@pytest.fixture(scope="module")
def tiny():
    return tiny_with_signal()


def test_a_graphed_text_encoder_records_a_new_graph_when_clip_skip_changes():
    """``GraphedCall`` replays the graph of a call's key; ``encode_ids`` reads ``layer`` (CLIP skip) from Python, so
    the key must hold it, else a graph recorded for the last layer would keep being replayed after clip_skip=2."""
    model = ldm.load(config=TINY)
    optimize(model, compile=False, compile_text="graph")
    enc = model.cond_stage_model
    graphed = vars(enc)["encode_ids"]
    ids = enc.tokenize(["a red cat"])  # (1, 77)
    last = graphed.key((ids,), {})
    set_clip_skip(model, 2)
    assert graphed.key((ids,), {}) != last
    set_clip_skip(model, 1)
    assert graphed.key((ids,), {}) == last


def _reference_cfg(model, x: torch.Tensor, sigma: float, prompt: str, negative: str, scale: float,
                   phi: float) -> torch.Tensor:
    """D_u + s·(D_c − D_u), then Lin et al. 2023 eqs. 16–17 on x̂0, written out by hand. x: (1, C, h, w)."""
    den = model.denoiser()
    ctx = model.encode_text([prompt, negative])  # (2, 77, D)
    s = torch.tensor([sigma], dtype=torch.float64)
    with torch.no_grad():
        d_c, d_u = den(x, s, context=ctx[:1]), den(x, s, context=ctx[1:])
    cfg = d_u + scale * (d_c - d_u)
    rescaled = cfg * d_c.std() / cfg.std()
    return phi * rescaled + (1 - phi) * cfg


@pytest.mark.parametrize("scale,phi", [(3.0, 0.0), (3.0, 0.7), (1.0, 0.7)])
def test_guidance_negative_prompt_and_rescale_reach_the_denoiser(tiny, scale, phi):
    """One DDPM step into σ = 0 returns the guided x̂0 itself: it must be the reference computed from the user's
    guidance, negative prompt and rescale (at guidance 1 the negative prompt and rescale change nothing)."""
    from ldm.diffusion.schedules import get_sigmas

    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    sigma = float(get_sigmas(tiny.alphas_cumprod, 1, "trailing")[0])
    z = tiny.generate(["a red cat"], negative_prompts="blurry", sampler="ddpm", sigmas="trailing", steps=1,
                      guidance=scale, guidance_rescale=phi, latents=noise, output="latent", progress=False)
    x = noise * (sigma**2 + 1) ** 0.5
    ref = _reference_cfg(tiny, x, sigma, "a red cat", "blurry", scale, phi)
    torch.testing.assert_close(z, ref, rtol=1e-4, atol=1e-4)
    if scale == 1.0:
        plain = tiny.generate(["a red cat"], sampler="ddpm", sigmas="trailing", steps=1, guidance=1.0,
                              latents=noise, output="latent", progress=False)
        torch.testing.assert_close(z, plain, rtol=0, atol=0)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    return ldm.save(ldm.load(config=TINY), tmp_path_factory.mktemp("m") / "tiny.safetensors")


def test_every_cli_option_reaches_the_loader_and_generate(ckpt, tmp_path, monkeypatch):
    import ldm.pipeline

    loads, calls = [], []
    real_load, real_generate = ldm.load, ldm.pipeline.generate
    monkeypatch.setattr(ldm, "load", lambda *a, **k: loads.append(k) or real_load(*a, **dict(k, vae=None)))
    monkeypatch.setattr(ldm.pipeline, "generate", lambda *a, **k: calls.append(k) or real_generate(*a, **k))
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "in.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "mask.png")
    (tmp_path / "vae.ckpt").write_bytes(b"not read: ldm.load is stubbed")
    rc = main(["--checkpoint", str(ckpt), "--prompt", "a red cat", "--n", "2", "--batch-size", "1", "--dtype", "fp32",
               "--negative-prompt", "blurry", "--sampler", "ddim", "--sigmas", "leading", "--steps", "2",
               "--guidance", "3.5", "--guidance-rescale", "0.25", "--eta", "0.5", "--seed", "5", "--height", "32",
               "--width", "32", "--init-image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
               "--strength", "0.6", "--long-prompts", "--clip-skip", "2", "--vae", str(tmp_path / "vae.ckpt"),
               "--device", "cpu", "--out", str(tmp_path / "out")])
    assert rc == 0
    assert loads[0]["clip_skip"] == 2 and loads[0]["vae"] == str(tmp_path / "vae.ckpt")
    assert loads[0]["device"] == "cpu" and loads[0]["dtype"] == torch.float32 and loads[0]["use_ema"] is False
    want = dict(negative_prompts="blurry", sampler="ddim", sigmas="leading", steps=2, guidance=3.5,
                guidance_rescale=0.25, eta=0.5, height=32, width=32, strength=0.6, long_prompts=True)
    assert [{k: c[k] for k in want} for c in calls] == [want, want]
    assert [c["seed"] for c in calls] == [5, 6]  # one image per batch: each its own seed
    for c in calls:
        assert c["init_image"].size == (32, 32) and c["mask"].getpixel((0, 0)) == 255


def test_images_are_written_whole_or_not_at_all(tmp_path):
    """Images and grids were written with PIL's ``save`` straight to their name: a crash or a full disk mid-write
    left a truncated PNG under it (an earlier run's image replaced by a broken one)."""
    from PIL import PngImagePlugin

    from ldm.pipeline_io import save_png

    path = tmp_path / "00000-0.png"
    save_png(Image.new("RGB", (8, 8), "red"), path)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a prompt")

    class Full(Image.Image):  # a write that fails half-way, as on a full disk
        def save(self, fp, *args, **kwargs):
            with open(fp, "wb") as f:
                f.write(b"\x89PNG\r\n")
            raise OSError(28, "No space left on device")

    broken = Full()
    with pytest.raises(OSError, match="No space left"):
        save_png(broken, path, pnginfo=info)
    assert Image.open(path).getpixel((0, 0)) == (255, 0, 0) and [p.name for p in tmp_path.iterdir()] == [path.name]
    save_png(Image.new("RGB", (8, 8), "blue"), path, pnginfo=info)
    assert Image.open(path).text["parameters"] == "a prompt" and Image.open(path).getpixel((0, 0)) == (0, 0, 255)
