"""The model object: build from configs, ldm.load / ldm.save, generate (txt2img, img2img, inpainting)."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

import ldm
from ldm.checkpoint import CheckpointError, ema_key, read_state_dict
from ldm.config import load_config
from ldm.diffusion.samplers import SAMPLERS
from ldm.diffusion.schedules import ldm_schedule_buffers, make_betas
from tiny_model import tiny_with_signal

TINY = "configs/tiny/txt2img.yaml"


@pytest.fixture(scope="module")
def tiny():
    return tiny_with_signal()


def test_tiny_shapes_and_named_parts(tiny):
    assert tiny.encode_text(["a", "b"]).shape == (2, 77, 64)
    z = tiny.generate(["a cat"], steps=2, seed=0, output="latent", progress=False)
    assert z.shape == (1, 4, 8, 8)
    img = tiny.generate("a cat", steps=2, seed=0, progress=False)[0]
    assert img.size == (32, 32)
    post = tiny.vae.encode(torch.zeros(1, 3, 32, 32))
    assert post.mean.shape == (1, 4, 8, 8) and post.sample().shape == (1, 4, 8, 8)
    assert tiny.unet(torch.zeros(2, 4, 8, 8), torch.tensor([1, 999]), context=torch.zeros(2, 77, 64)).shape == (2, 4, 8, 8)


def test_each_image_has_its_own_seed(tiny):
    one = tiny.generate(["dog"], steps=3, seed=11, output="latent", progress=False, sampler="euler_a")
    two = tiny.generate(["cat", "dog"], steps=3, seed=10, output="latent", progress=False, sampler="euler_a")
    assert torch.allclose(one[0], two[1], rtol=1e-4, atol=1e-3)  # batched matmuls round differently
    assert not torch.allclose(two[0], two[1], atol=1e-3)


def test_supplied_latents_replace_the_seed(tiny):
    noise = torch.randn(1, 4, 8, 8)
    a = tiny.generate(["x"], steps=2, latents=noise, seed=1, output="latent", progress=False)
    b = tiny.generate(["x"], steps=2, latents=noise, seed=2, output="latent", progress=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_runs_through_generate(tiny, sampler):
    z = tiny.generate(["x"], negative_prompts=["blurry"], steps=3, seed=0, sampler=sampler, output="latent",
                      progress=False, guidance_rescale=0.5)
    assert torch.isfinite(z).all()


def test_negative_prompt_changes_the_result(tiny):
    a = tiny.generate(["x"], steps=2, seed=0, output="latent", progress=False)
    b = tiny.generate(["x"], negative_prompts=["something else"], steps=2, seed=0, output="latent", progress=False)
    assert not torch.allclose(a, b)


def test_img2img_and_inpainting_keep_the_known_region(tiny):
    init = torch.rand(1, 3, 32, 32) * 2 - 1
    z = tiny.generate(["x"], init_image=init, strength=0.5, steps=4, seed=0, output="latent", progress=False)
    assert z.shape == (1, 4, 8, 8)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :, 16:] = 1  # repaint the right half
    z = tiny.generate(["x"], init_image=init, mask=mask, strength=1.0, steps=4, seed=0, output="latent", progress=False)
    z0 = tiny.vae.encode_latents(init)
    assert torch.allclose(z[..., :4], z0[..., :4], atol=1e-5)
    assert not torch.allclose(z[..., 4:], z0[..., 4:], atol=1e-2)


@pytest.mark.parametrize("kw, match", [
    (dict(steps=0), "steps"), (dict(height=30), "height"), (dict(sampler="nope"), "unknown sampler"),
    (dict(guidance=float("nan")), "guidance"), (dict(strength=0.0), "strength"), (dict(mask=torch.ones(1, 1, 8, 8)), "init_image"),
    (dict(guidance_rescale=1.5), "guidance_rescale must be in"),
])
def test_bad_generate_arguments(tiny, kw, match):
    with pytest.raises(ValueError, match=match):
        tiny.generate(["x"], progress=False, **kw)


def test_save_load_round_trip_exact_with_config(tiny, tmp_path):
    path = ldm.save(tiny, tmp_path / "m.safetensors")
    back = ldm.load(path)
    a, b = tiny.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert OmegaConf.to_container(back.config.model) == OmegaConf.to_container(tiny.config.model)


def test_ema_weights_load_on_request(tiny, tmp_path):
    sd = dict(tiny.state_dict())
    for n, p in tiny.model.named_parameters():
        sd[ema_key(n)] = p.detach() + 1.0
    sd.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(3)})
    sd.update(ldm_schedule_buffers(make_betas("linear")))
    path = tmp_path / "ema.ckpt"
    torch.save({"state_dict": sd}, path)
    raw = ldm.load(path, TINY)
    ema = ldm.load(path, TINY, use_ema=True)
    w = "model.diffusion_model.out.2.weight"
    assert torch.equal(raw.state_dict()[w], tiny.state_dict()[w])
    assert torch.equal(ema.state_dict()[w], tiny.state_dict()[w] + 1.0)


def test_strict_load_names_missing_and_unexpected_keys(tiny, tmp_path):
    sd = dict(tiny.state_dict())
    sd.pop("model.diffusion_model.out.2.weight")
    sd["model.diffusion_model.extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match=r"missing.*out\.2\.weight.*unexpected.*extra\.weight"):
        ldm.load(tmp_path / "bad.ckpt", TINY)


def test_schedule_mismatch_is_refused(tiny, tmp_path):
    sd = dict(tiny.state_dict())
    sd.update(ldm_schedule_buffers(make_betas("cosine")))
    torch.save(sd, tmp_path / "cos.ckpt")
    with pytest.raises(CheckpointError, match="alphas_cumprod"):
        ldm.load(tmp_path / "cos.ckpt", TINY)


def test_linear_and_one_by_one_conv_weights_are_interchangeable(tiny, tmp_path):
    """Files converted back from diffusers may hold the autoencoder's attention q/k/v/proj_out as Linear weights."""
    sd = dict(tiny.state_dict())
    k = next(k for k, v in sd.items() if k.startswith("first_stage_model.") and v.ndim == 4 and v.shape[2:] == (1, 1))
    sd[k] = sd[k][:, :, 0, 0]  # (C_out, C_in)
    torch.save(sd, tmp_path / "flat.ckpt")
    back = ldm.load(tmp_path / "flat.ckpt", TINY)
    assert torch.equal(back.state_dict()[k], tiny.state_dict()[k])
    sd[k] = sd[k][:1]  # a real shape mismatch is still an error
    torch.save(sd, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match="other shapes"):
        ldm.load(tmp_path / "bad.ckpt", TINY)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_schedule_buffers_are_accepted(tiny, tmp_path, dtype):
    """Files converted to fp16/bf16 whole (buffers included) round ᾱ by up to 2.4e-4 / 2e-3: still the schedule."""
    sd = dict(tiny.state_dict())
    sd.update({k: v.to(dtype) for k, v in ldm_schedule_buffers(make_betas("linear")).items()})
    torch.save(sd, tmp_path / "half.ckpt")
    ldm.load(tmp_path / "half.ckpt", TINY)
    sd.update({k: v.to(dtype) for k, v in ldm_schedule_buffers(make_betas("cosine")).items()})
    torch.save(sd, tmp_path / "cos.ckpt")
    with pytest.raises(CheckpointError, match="alphas_cumprod"):
        ldm.load(tmp_path / "cos.ckpt", TINY)


def test_original_yaml_params_that_we_do_not_know_fail_by_name(tmp_path):
    cfg = load_config(TINY)
    cfg.model.params.use_fancy_thing = True
    with pytest.raises(ValueError, match="use_fancy_thing"):
        ldm.load(config=cfg)


@pytest.fixture(scope="module")
def sd_v1_file(tmp_path_factory):
    """A full-size SD v1 checkpoint in the original layout (random weights, fp16, nested state_dict, the 12
    schedule buffers, EMA counters and the legacy position_ids key), as released files are."""
    torch.manual_seed(0)
    model = ldm.load(config="sd/v1-inference.yaml")
    sd = {k: v.half() for k, v in model.state_dict().items()}
    sd.update(ldm_schedule_buffers(make_betas("linear")))
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["model_ema.decay"], sd["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(0)
    path = tmp_path_factory.mktemp("sd") / "sd-v1-random.ckpt"
    torch.save({"state_dict": sd, "global_step": 0}, path)
    return path, model


def test_full_size_sd_v1_detected_loaded_strictly_and_generates(sd_v1_file):
    path, model = sd_v1_file
    assert sum(p.numel() for p in model.unet.parameters()) == 859_520_964
    back = ldm.load(path)  # no config: detected from keys and shapes
    a = back.state_dict()
    sd, _ = read_state_dict(path)
    for k in ("model.diffusion_model.input_blocks.1.1.proj_in.weight", "first_stage_model.decoder.conv_out.weight",
              "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight"):
        assert torch.equal(a[k], sd[k].float())
    img = back.generate(["a photograph of an astronaut riding a horse"], steps=1, height=64, width=64, seed=0,
                        progress=False)[0]
    assert img.size == (64, 64)


def test_half_precision_keeps_the_schedule_exact(tiny):
    import copy

    m = copy.deepcopy(tiny).to(dtype=torch.bfloat16)
    assert m.alphas_cumprod.dtype == torch.float64
    assert torch.equal(m.alphas_cumprod, tiny.alphas_cumprod)
    assert m.vae.scale_factor.dtype == torch.float32


def test_inpainting_with_a_batch_of_two(tiny):
    init = torch.rand(2, 3, 32, 32) * 2 - 1
    mask = torch.zeros(2, 1, 32, 32)
    mask[..., 16:, :] = 1
    z = tiny.generate(["a", "b"], init_image=init, mask=mask, steps=3, seed=0, output="latent", progress=False)
    assert torch.allclose(z[..., :4, :], tiny.vae.encode_latents(init)[..., :4, :], atol=1e-5)
