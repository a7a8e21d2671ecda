"""``generate``'s inputs checked before any work, each error naming its argument; EXIF-rotated pictures read upright;
DDIM's leading timesteps refused where they would stop far below the noise sampling starts from."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.diffusion.schedules import ddim_timesteps, get_sigmas, make_betas
from ldm.pipeline_io import open_image, to_image_tensor, to_mask_tensor
from tiny_model import tiny_with_signal


@pytest.fixture(scope="module")
def tiny():
    return tiny_with_signal()


def _gen(model, **kw):
    args = dict(steps=2, seed=1, output="latent", progress=False)
    return model.generate(kw.pop("prompts", ["a", "b"]), **{**args, **kw})


@pytest.mark.parametrize("kw,match", [
    (dict(init_image=torch.zeros(3, 3, 32, 32)), r"init_image tensor must be \(B, 3, H, W\).*B = 1 or 2.*\(3, 3"),
    (dict(init_image=torch.zeros(2, 4, 32, 32)), r"init_image tensor must be"),
    (dict(init_image=torch.zeros(1, 3, 32, 32), mask=torch.ones(1, 3, 32, 32)), r"mask tensor must be \(B, 1, H, W\)"),
    (dict(init_image=torch.zeros(1, 3, 32, 32), mask=torch.ones(3, 1, 32, 32)), r"mask tensor must be.*\(3, 1"),
    (dict(latents=torch.zeros(2, 4, 6, 6), height=32, width=32),
     r"latents must be \(B, C, h, w\) = \(2, 4, 8, 8\) for 2 prompt\(s\) at 32x32 px, got \(2, 4, 6, 6\)"),
    (dict(latents=torch.zeros(1, 4, 4, 4)), r"latents must be .* for 2 prompt"),
    (dict(prompts=[]), r"prompts is empty"),
    (dict(strength=0.5), r"strength applies to img2img and inpainting: it needs init_image"),
    (dict(seed=2**64 - 1), r"seed must be below 2\*\*62"),
])
def test_bad_inputs_are_named_before_any_work(tiny, kw, match):
    with pytest.raises(ValueError, match=match):
        _gen(tiny, **kw)


@pytest.mark.parametrize("kw,match", [(dict(height=32.0), "height must be an integer, got float"),
                                      (dict(steps=True), "steps must be an integer, got bool"),
                                      (dict(seed="3"), "seed must be an integer, got str")])
def test_non_integers_are_refused_by_name(tiny, kw, match):
    with pytest.raises(TypeError, match=match):
        _gen(tiny, **kw)


def test_numpy_integers_count_as_integers(tiny):
    """``steps=np.int64(2)`` said "steps must be a positive integer, got 2"; numpy integers are integers."""
    a = _gen(tiny, steps=np.int64(2), seed=np.int32(1), height=np.int64(32), width=32)
    assert torch.equal(a, _gen(tiny, steps=2, seed=1, height=32, width=32))


def test_latents_give_the_size_when_height_and_width_are_not_given(tiny):
    lat = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(0))
    z = _gen(tiny, latents=lat)  # the tiny autoencoder's factor is 4: 24x20 px
    assert z.shape == (2, 4, 6, 5)


def test_a_batch_one_tensor_mask_serves_every_prompt(tiny):
    img, m = torch.zeros(1, 3, 32, 32), torch.zeros(1, 1, 32, 32)
    m[..., :16] = 1
    z = _gen(tiny, init_image=img, mask=m, strength=1.0, height=32, width=32)
    assert z.shape == (2, 4, 8, 8)


def _rotated_jpeg(tmp_path):
    """A 64×40 JPEG whose EXIF orientation 6 (rotate 90° clockwise to view) shows it as 40×64, right half red."""
    stored = np.zeros((40, 64, 3), np.uint8)
    stored[:20] = (255, 0, 0)  # the stored top rows, which turning clockwise puts on the displayed right
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    im.save(path, exif=exif.tobytes(), quality=95)
    return path


def test_pictures_are_read_as_displayed_by_their_exif_orientation(tmp_path):
    path = _rotated_jpeg(tmp_path)
    im = open_image(path)
    assert im.size == (40, 64)  # (width, height) as displayed
    arr = np.asarray(im.convert("RGB")).astype(int)
    assert arr[:, 25:, 0].mean() > 200 and arr[:, :15, 0].mean() < 50  # the stored top is the displayed right
    t = to_image_tensor(str(path), 1, 64, 40)  # a path through generate's reader
    assert t[0, 0, :, 25:].mean() > 0.8 and t[0, 0, :, :15].mean() < -0.8
    with Image.open(path) as raw:  # an opened PIL image given directly is turned too
        assert to_mask_tensor(raw.copy(), 1, 64, 40).shape == (1, 1, 64, 40)
        assert torch.allclose(to_image_tensor(raw.copy(), 1, 64, 40), t)


@pytest.mark.parametrize("steps", [501, 600, 998])
def test_leading_timesteps_past_half_the_schedule_are_refused(steps):
    """Stride T // S = 1 stopped the timesteps at t = S: σ(600) = 2.3 where the schedule starts at 14.6."""
    with pytest.raises(ValueError, match=rf"{steps} steps on DDIM's leading timesteps.*at most 500 steps"):
        ddim_timesteps(1000, steps)
    ac = torch.cumprod(1 - make_betas("linear"), 0)
    for kind in ("ddim", "leading"):
        with pytest.raises(ValueError, match="leading timesteps"):
            get_sigmas(ac, steps, kind)
    assert get_sigmas(ac, steps, "trailing")[0] == pytest.approx(get_sigmas(ac, 1000, "trailing")[0].item())


@pytest.mark.parametrize("steps", [1, 50, 500, 999, 1000])
def test_leading_timesteps_that_reach_the_top_are_kept(steps):
    t = ddim_timesteps(1000, steps)
    assert len(t) == steps and int(t[0]) >= 999 - 1000 // steps


def test_sample_cli_records_guidance_rescale_and_long_prompts(tmp_path):
    from ldm.cli.sample import main

    out = tmp_path / "o"
    main(["--config", "configs/tiny/txt2img.yaml", "--prompt", "x", "--steps", "1", "--out", str(out),
          "--guidance-rescale", "0.7", "--long-prompts", "--device", "cpu"])
    with Image.open(out / "00000-0.png") as im:
        text = im.info["parameters"]
    assert "Guidance rescale: 0.7" in text and "Long prompts: True" in text
