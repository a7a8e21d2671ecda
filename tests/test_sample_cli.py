"""scripts/sample.py: PNG metadata, grid, and bad arguments rejected before any model loads."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

import ldm
from ldm.cli.sample import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    return ldm.save(ldm.load(config="configs/tiny/txt2img.yaml"), tmp_path_factory.mktemp("m") / "tiny.safetensors")


def test_writes_pngs_with_parameters_and_a_grid(ckpt, tmp_path):
    rc = main(["--checkpoint", str(ckpt), "--prompt", "cat face, flat emoji", "--prompt", "dog", "--n", "2",
               "--negative-prompt", "blurry", "--steps", "2", "--seed", "7", "--sampler", "euler_a",
               "--out", str(tmp_path), "--dtype", "fp32"])
    assert rc == 0
    files = sorted(tmp_path.glob("0*.png"))
    assert len(files) == 4 and (tmp_path / "grid.png").is_file()
    text = Image.open(files[1]).text["parameters"]
    assert text.startswith("cat face, flat emoji\nNegative prompt: blurry\n")
    assert "Steps: 2, Sampler: euler_a" in text and "Seed: 8" in text and "Size: 32x32" in text and "ldm 0.1.0" in text


def test_sampler_defaults_reach_the_library(ckpt, tmp_path, monkeypatch):
    """No --eta: the sampler's own default (euler_a stays ancestral); --eta and --sigmas are passed on and recorded."""
    import ldm.pipeline

    seen = []
    real = ldm.pipeline.generate
    monkeypatch.setattr(ldm.pipeline, "generate", lambda *a, **k: seen.append(k) or real(*a, **k))
    base = ["--checkpoint", str(ckpt), "--prompt", "x", "--steps", "2", "--sampler", "euler_a", "--dtype", "fp32"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--out", str(tmp_path / "b"), "--eta", "0.5", "--sigmas", "leading"]) == 0
    assert seen[0]["eta"] is None and seen[1]["eta"] == 0.5 and seen[1]["sigmas"] == "leading"
    texts = [Image.open(tmp_path / d / "00000-0.png").text["parameters"] for d in "ab"]
    assert "Eta" not in texts[0] and "Eta: 0.5" in texts[1] and "Schedule: leading" in texts[1]


def test_lora_and_embedding_files_reach_the_loader(ckpt, tmp_path, monkeypatch):
    from ldm.checkpoint import save_safetensors

    lora = tmp_path / "style.safetensors"
    save_safetensors({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, lora)
    seen = []
    real = ldm.load
    monkeypatch.setattr(ldm, "load", lambda *a, **k: seen.append(k) or real(*a, **dict(k, lora=None)))
    emb = tmp_path / "neg.safetensors"
    save_safetensors({"emb_params": torch.randn(2, 64)}, emb)
    assert main(["--checkpoint", str(ckpt), "--prompt", "x, bad", "--steps", "1", "--dtype", "fp32", "--out",
                 str(tmp_path / "o"), "--lora", str(lora), "--lora-scale", "0.8", "--embedding", f"bad={emb}"]) == 0
    assert seen[0]["lora"] == [str(lora)] and seen[0]["lora_scale"] == 0.8
    assert seen[0]["embeddings"] == [("bad", str(emb))]
    assert "LoRA: style.safetensors:0.8" in Image.open(tmp_path / "o" / "00000-0.png").text["parameters"]


@pytest.mark.parametrize("args, msg", [
    (["--steps", "0"], "--steps"), (["--height", "30"], "--height"), (["--guidance", "nan"], "--guidance"),
    (["--init-image", "missing.png"], "missing.png"), (["--mask", "m.png"], "not found"),
    (["--compile", "--cuda-graph"], "give --compile or --cuda-graph"),
    (["--lora", "missing.safetensors"], "missing.safetensors"), (["--lora-scale", "0.5"], "--lora-scale"),
    (["--vae", "nope.safetensors"], "nope.safetensors"), (["--clip-skip", "3"], "--clip-skip"),
    (["--embedding", "neg=absent.pt"], "absent.pt"), (["--guidance-rescale", "1.5"], "--guidance-rescale"),
    (["--eta", "-1"], "--eta must be >= 0"), (["--strength", "0"], "--strength must be in (0, 1]"),
])
def test_bad_arguments_fail_in_one_line_before_loading(ckpt, tmp_path, caplog, monkeypatch, args, msg):
    monkeypatch.setattr(ldm, "load", lambda *a, **k: pytest.fail("model loaded before the arguments were checked"))
    rc = main(["--checkpoint", str(ckpt), "--prompt", "x", "--out", str(tmp_path), *args])
    assert rc == 2 and msg in caplog.text


def test_attention_flag_sets_the_unets_backend_and_a_missing_one_is_refused_before_loading(ckpt, tmp_path, caplog,
                                                                                            monkeypatch):
    import sys

    from ldm.attention_fa4 import interface

    models = []
    real = ldm.load
    monkeypatch.setattr(ldm, "load", lambda *a, **k: models.append(real(*a, **k)) or models[-1])
    base = ["--checkpoint", str(ckpt), "--prompt", "x", "--steps", "1", "--dtype", "fp32"]
    assert main([*base, "--out", str(tmp_path / "a"), "--attention", "math"]) == 0
    assert main([*base, "--out", str(tmp_path / "b")]) == 0
    assert [m.unet.attn_backend for m in models] == ["math", "sdpa"]
    assert main([*base, "--out", str(tmp_path / "c"), "--attention", "nope"]) == 2
    assert "unknown attention backend 'nope'" in caplog.text
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    interface.cache_clear()
    try:
        assert main([*base, "--out", str(tmp_path / "d"), "--attention", "fa4"]) == 2
    finally:
        interface.cache_clear()
    assert "pip install 'ldm[fa4]'" in caplog.text and len(models) == 2


def test_unknown_sampler_is_rejected(ckpt, capsys):
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(ckpt), "--prompt", "x", "--sampler", "nope"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("flag,kw", [(["--compile"], {"mode": "reduce-overhead"}),
                                     (["--compile", "max-autotune"], {"mode": "max-autotune"}),
                                     (["--cuda-graph"], None), ([], None)])
def test_compile_flag_takes_the_fast_path_with_its_mode(ckpt, tmp_path, monkeypatch, flag, kw):
    import ldm.fast

    calls = []
    monkeypatch.setattr(ldm.fast, "optimize", lambda model, **k: calls.append(k) or model)
    rc = main(["--checkpoint", str(ckpt), "--prompt", "x", "--steps", "1", "--out", str(tmp_path), *flag])
    assert rc == 0 and calls == ([kw] if kw else [])


@pytest.mark.parametrize("flags,device,kw", [
    ([], "cuda", {"compile": False, "unet_graph": True}),  # the default on a GPU: the eager U-Net graphed
    (["--no-cuda-graph"], "cuda", None),
    (["--cuda-graph"], "cuda", {"compile": False, "unet_graph": True}),
    (["--compile"], "cuda", {"mode": "reduce-overhead"}),
    ([], "cpu", None), (["--cuda-graph"], "cpu", None),  # no CUDA graphs off a GPU (a warning says so)
    (["--compile"], "cpu", {"mode": "reduce-overhead"})])
def test_fast_path_defaults_to_cuda_graphs_on_a_gpu(flags, device, kw):
    from ldm.cli.sample import fast_path, parse_args

    assert fast_path(parse_args(["--checkpoint", "m.ckpt", "--prompt", "x", *flags]), device) == kw


def test_compiled_sampling_writes_the_images_eager_sampling_writes(ckpt, tmp_path):
    """A real compile of the tiny model on the CPU (inductor; CUDA graphs do not apply there): same images."""
    args = ["--checkpoint", str(ckpt), "--prompt", "cat face", "--steps", "2", "--dtype", "fp32"]
    assert main([*args, "--out", str(tmp_path / "eager")]) == 0
    assert main([*args, "--out", str(tmp_path / "fast"), "--compile"]) == 0
    import numpy as np

    a, b = (np.asarray(Image.open(tmp_path / d / "00000-0.png"), dtype=np.int16) for d in ("eager", "fast"))
    assert np.abs(a - b).max() <= 2  # 8-bit pixels; fused projections and inductor reorder float32 sums
