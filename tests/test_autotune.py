"""ldm.autotune: the guard against 8-warp Triton convolution templates (pytorch/pytorch#173068) on torch builds
whose inductor does not cap them."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from torch._inductor.choices import InductorChoices

import ldm
import ldm.autotune as autotune
from ldm.fast import optimize

OFFERED = [SimpleNamespace(kwargs={"BLOCK_M": 64}, num_stages=4, num_warps=4),
           SimpleNamespace(kwargs={"BLOCK_M": 128}, num_stages=3, num_warps=8),
           SimpleNamespace(kwargs={"BLOCK_M": 64}, num_stages=2, num_warps=2)]


@pytest.fixture
def offered(monkeypatch):
    """InductorChoices offering OFFERED for any convolution; the class is restored after the test."""
    monkeypatch.setattr(InductorChoices, "get_conv_configs",
                        lambda self, device_type="cuda": lambda *a, **k: iter(OFFERED))


def _offered_now() -> list[int]:
    return [c.num_warps for c in InductorChoices().get_conv_configs("cuda")(8192, 320, 2880, dtype_size=2)]


@pytest.mark.parametrize("mode,options,expected", [("max-autotune", None, True),
                                                   ("max-autotune-no-cudagraphs", None, True),
                                                   ("reduce-overhead", None, False), (None, None, False),
                                                   ("reduce-overhead", {"max_autotune": True}, True),
                                                   ("max-autotune", {"max_autotune": False}, False)])
def test_which_compiles_autotune(mode, options, expected):
    assert autotune.autotunes(mode, options) is expected


def test_the_cap_is_read_from_inductors_source(monkeypatch):
    monkeypatch.setattr(autotune.inspect, "getsource", lambda m: "num_warps = cfg.num_warps if unroll else "
                                                                 "min(cfg.num_warps, 4)")
    assert autotune.inductor_caps_conv_warps()
    monkeypatch.setattr(autotune.inspect, "getsource", lambda m: "num_warps=cfg.num_warps,")
    assert not autotune.inductor_caps_conv_warps()


def test_the_cap_drops_eight_warp_configs_once(offered):
    assert _offered_now() == [4, 8, 2]
    assert autotune.cap_conv_template_warps() is True
    assert _offered_now() == [4, 2]
    assert autotune.cap_conv_template_warps() is False  # installed once, not stacked


@pytest.mark.parametrize("mode,options,guarded", [("reduce-overhead", {"max_autotune": True}, True),
                                                  ("reduce-overhead", None, False)])
def test_optimize_guards_an_autotuning_compile_on_an_uncapped_torch(monkeypatch, offered, caplog, mode, options,
                                                                   guarded):
    monkeypatch.setattr(autotune, "inductor_caps_conv_warps", lambda: False)  # as torch 2.11's inductor
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    with caplog.at_level(logging.WARNING, logger="ldm.autotune"):
        optimize(ldm.load(config="configs/tiny/txt2img.yaml"), mode=mode, options=options, fuse_projections=False,
                 inductor_flags=False)
    assert _offered_now() == ([4, 2] if guarded else [4, 8, 2])
    assert ("pytorch/pytorch#173068" in caplog.text) is guarded


def test_a_capped_torch_is_left_alone(monkeypatch, offered):
    monkeypatch.setattr(autotune, "inductor_caps_conv_warps", lambda: True)
    autotune.guard_conv_templates("max-autotune", None)
    assert _offered_now() == [4, 8, 2]


def test_the_pinned_torch_has_the_cap_and_is_recognised():
    """The torch that `make test` installs (2.14) caps the warps itself; the source line the guard looks for is
    there, so the guard stays out of its way."""
    assert autotune.inductor_caps_conv_warps(), torch.__version__


@pytest.mark.parametrize("mode,guarded", [("max-autotune", True), (None, False)])
def test_a_training_compile_that_autotunes_is_guarded_too(monkeypatch, offered, mode, guarded):
    from omegaconf import OmegaConf

    from ldm.diffusion.lightning import compile_unet

    monkeypatch.setattr(autotune, "inductor_caps_conv_warps", lambda: False)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    compile_unet(torch.nn.Linear(2, 2), OmegaConf.create({"compile": True, "compile_mode": mode}))
    assert _offered_now() == ([4, 2] if guarded else [4, 8, 2])
