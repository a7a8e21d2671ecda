"""U-Net: equality with diffusers' UNet2DConditionModel through diffusers' own LDM converter, the original SD
key layout at full size (meta device), attention backends, upcast, gradient checkpointing, bad arguments."""
from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.attention import AttentionBackendError
from ldm.unet import UNetModel, count_params
from ldm.unet.attention import BasicTransformerBlock, CrossAttention, SpatialTransformer
from ldm.unet.blocks import ResBlock
from ldm.unet.model import attention_heads

from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm)

PREFIX = "model.diffusion_model."
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "sd"

# SD v1 / v2 shapes at reduced width (GroupNorm needs channels divisible by 32).
TINY_V1 = dict(image_size=16, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2, 1],
               num_res_blocks=2, channel_mult=[1, 2, 2, 2], num_heads=8, use_spatial_transformer=True,
               transformer_depth=1, context_dim=32, use_checkpoint=False, legacy=False)
TINY_V2 = dict(image_size=16, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2, 1],
               num_res_blocks=2, channel_mult=[1, 2, 2, 2], num_head_channels=8, use_spatial_transformer=True,
               use_linear_in_transformer=True, transformer_depth=1, context_dim=64, use_checkpoint=False,
               legacy=False)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (the zero-initialised output convs would make any comparison trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif name.endswith("weight") and ("norm" in name or ".0.weight" in name):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))  # GroupNorm / LayerNorm gains
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def diffusers_config(unet_params: dict, ckpt: dict, image_size: int) -> dict:
    """diffusers' own config for an original U-Net config (its ``image_size`` deprecation warning silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return create_unet_diffusers_config_from_ldm(ldm_config(unet_params), ckpt, image_size=image_size)


def ldm_config(unet_params: dict) -> dict:
    """The original-config structure diffusers' ``create_unet_diffusers_config_from_ldm`` reads."""
    return {"model": {"params": {"unet_config": {"params": unet_params},
                                 "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}


def to_diffusers(ours: UNetModel, params: dict, **extra) -> tuple[UNet2DConditionModel, dict]:
    """Convert our state dict with diffusers' own converter and load it strictly into diffusers' U-Net."""
    ckpt = {PREFIX + k: v for k, v in ours.state_dict().items()}
    config = diffusers_config(params, ckpt, params["image_size"] * 8)
    config.update(extra)
    converted = convert_ldm_unet_checkpoint(ckpt, config)
    ref = UNet2DConditionModel(**config)
    missing, unexpected = ref.load_state_dict(converted, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return ref.eval(), converted


def inputs(params: dict, batch: int = 2, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    s = params["image_size"]
    out = dict(x=torch.randn(batch, params["in_channels"], s, s, generator=g),
               timesteps=torch.tensor([10.0, 700.5])[:batch],
               context=torch.randn(batch, 7, params["context_dim"], generator=g))
    if params.get("num_classes") == "sequential":
        out["y"] = torch.randn(batch, params["adm_in_channels"], generator=g)
    elif isinstance(params.get("num_classes"), int):
        out["y"] = torch.randint(0, params["num_classes"], (batch,), generator=g)
    return out


def build(params: dict, seed: int = 0, **kw) -> UNetModel:
    torch.manual_seed(seed)
    return randomize_(UNetModel(**params, **kw), seed).eval()


VARIANTS = {
    "v1": (TINY_V1, {}),
    "v2": (TINY_V2, {}),
    "v1-inpaint": ({**TINY_V1, "in_channels": 9}, {}),
    # SD 2 unCLIP-style adm conditioning, two transformer layers, cross-attention-only first level
    "v2-adm": ({**TINY_V2, "num_classes": "sequential", "adm_in_channels": 16, "transformer_depth": 2,
                "disable_self_attentions": [True, False, False, False]}, {}),
    # SD x4-upscaler-style class embedding, FiLM (scale-shift) ResBlocks
    "v2-classes": ({**TINY_V2, "num_classes": 10, "use_scale_shift_norm": True},
                   {"resnet_time_scale_shift": "scale_shift"}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_equals_diffusers(variant):
    params, extra = VARIANTS[variant]
    ours = build(params)
    ref, _ = to_diffusers(ours, params, **extra)
    inp = inputs(params)
    with torch.no_grad():
        out = ours(**inp)
        expected = ref(inp["x"], inp["timesteps"], encoder_hidden_states=inp["context"],
                       class_labels=inp.get("y")).sample
    assert out.shape == (2, params["out_channels"], params["image_size"], params["image_size"])
    scale = expected.abs().max().item()
    assert scale > 0.1  # a random-weight network, not zeros
    assert (out - expected).abs().max().item() <= 1e-4 * scale


def test_equality_is_sensitive():
    """The comparison above can fail: nudging one weight changes the output far beyond its tolerance."""
    ours = build(TINY_V1)
    ref, _ = to_diffusers(ours, TINY_V1)
    with torch.no_grad():
        ours.input_blocks[1][1].transformer_blocks[0].attn2.to_k.weight[0, 0] += 0.5
        inp = inputs(TINY_V1)
        diff = (ours(**inp) - ref(inp["x"], inp["timesteps"], encoder_hidden_states=inp["context"]).sample).abs()
    assert diff.max().item() > 1e-3


@pytest.mark.parametrize("variant", ["v1", "v2"])
@pytest.mark.parametrize("hw", [(13, 16), (17, 11), (9, 9)])
def test_latent_sides_not_divisible_by_the_downsampling_equal_diffusers(variant, hw):
    """Latent sides that 2^(levels − 1) does not divide (SD at 520×512 px: 65×64): each upsampling is resized to
    its skip's size, as diffusers' ``upsample_size`` does, instead of failing in the skip concatenation."""
    params, extra = VARIANTS[variant]
    ours = build(params)
    ref, _ = to_diffusers(ours, params, **extra)
    inp = inputs(params)
    inp["x"] = torch.randn(2, 4, *hw, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = ours(**inp)
        expected = ref(inp["x"], inp["timesteps"], encoder_hidden_states=inp["context"]).sample
    assert out.shape == (2, 4, *hw)
    scale = expected.abs().max().item()
    assert scale > 0.1 and (out - expected).abs().max().item() <= 1e-4 * scale


def test_odd_sides_with_resampling_resblocks():
    """``resblock_updown`` U-Nets resample inside the ResBlock; the resized upsampling reaches it too."""
    params = {**TINY_V1, "resblock_updown": True}
    model = build(params)
    inp = inputs(params)
    inp["x"] = torch.randn(2, 4, 13, 10)
    with torch.no_grad():
        assert model(**inp).shape == (2, 4, 13, 10)


# -- full size, meta device ------------------------------------------------------------------------------------
def sd_unet_params(version: int):
    """The ``unet_config.params`` node of the original SD inference YAML (values are omegaconf ListConfigs)."""
    name = "v1-inference.yaml" if version == 1 else "v2-inference.yaml"
    return OmegaConf.load(CONFIGS / name).model.params.unet_config.params


def original_key(k: str) -> str:
    """diffusers → original LDM key for the SD layout (4 levels, 2 res blocks, attention on levels 0–2), written
    from diffusers' module names and the published diffusers → SD conversion table."""
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    head, _, leaf = k.rpartition(".")
    if head in fixed:
        return f"{fixed[head]}.{leaf}"
    resnet_names = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                    ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
    for old, new in resnet_names:
        if ".resnets." in k:
            k = k.replace(f".{old}.", f".{new}.")
    p = k.split(".")
    if p[0] == "down_blocks":
        i, kind, j, rest = int(p[1]), p[2], int(p[3]), ".".join(p[4:])
        if kind == "downsamplers":
            return f"input_blocks.{3 * (i + 1)}.0.op.{rest.removeprefix('conv.')}"
        return f"input_blocks.{3 * i + j + 1}.{0 if kind == 'resnets' else 1}.{rest}"
    if p[0] == "up_blocks":
        i, kind, j, rest = int(p[1]), p[2], int(p[3]), ".".join(p[4:])
        if kind == "upsamplers":
            return f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.{rest}"
        return f"output_blocks.{3 * i + j}.{0 if kind == 'resnets' else 1}.{rest}"
    if p[0] == "mid_block":
        idx = 1 if p[1] == "attentions" else 2 * int(p[2])
        return f"middle_block.{idx}.{'.'.join(p[3:])}"
    raise KeyError(k)


@pytest.mark.parametrize("version", [1, 2])
def test_full_size_layout(version):
    node = sd_unet_params(version)
    params = OmegaConf.to_container(node)
    with torch.device("meta"):
        ours = UNetModel(**node)  # the YAML's arguments as they are
    sd = ours.state_dict()
    assert len(sd) == 686
    if version == 1:
        assert count_params(ours) == 859_520_964
    else:
        assert count_params(ours) == 865_910_724

    # diffusers' converter consumes every key exactly once and yields exactly diffusers' U-Net keys and shapes
    ckpt = {PREFIX + k: v for k, v in sd.items()}
    config = diffusers_config(params, ckpt, 512)
    converted = convert_ldm_unet_checkpoint(ckpt, config)
    by_id = {id(v): k for k, v in sd.items()}
    consumed = [by_id[id(v)] for v in converted.values()]
    assert sorted(consumed) == sorted(sd)
    with torch.device("meta"):
        ref = UNet2DConditionModel(**config)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == ref_shapes

    # and our keys are the original checkpoint layout, derived independently from diffusers' module names
    assert {original_key(k): s for k, s in ref_shapes.items()} == {k: tuple(v.shape) for k, v in sd.items()}
    ctx, proj = (768, (320, 320, 1, 1)) if version == 1 else (1024, (320, 320))
    assert sd["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, ctx)
    assert sd["input_blocks.1.1.proj_in.weight"].shape == proj
    heads = [(m.transformer_blocks[0].attn1.heads, m.transformer_blocks[0].attn1.dim_head)
             for m in ours.modules() if isinstance(m, SpatialTransformer)]
    assert heads[:3:2] + heads[-1:] == ([(8, 40), (8, 80), (8, 40)] if version == 1 else [(5, 64), (10, 64), (5, 64)])


def test_head_count_rules_match_original():
    # values from the original formula: num_head_channels wins; legacy recomputes d_head = ch // n_heads
    assert attention_heads(1280, 8, -1, legacy=False) == (8, 160)
    assert attention_heads(1280, -1, 64, legacy=False) == (20, 64)
    assert attention_heads(1280, 8, 64, legacy=False) == (20, 64)
    assert attention_heads(96, -1, 64, legacy=False) == (1, 64)
    assert attention_heads(96, -1, 64, legacy=True) == (1, 96)
    assert attention_heads(100, 3, -1, legacy=True) == (3, 33)


def test_strict_load_with_prefix_stripped():
    a, b = build(TINY_V2, seed=0), build(TINY_V2, seed=1)
    ckpt = {PREFIX + k: v for k, v in a.state_dict().items()}
    b.load_state_dict({k.removeprefix(PREFIX): v for k, v in ckpt.items()}, strict=True)
    inp = inputs(TINY_V2)
    with torch.no_grad():
        assert torch.equal(a(**inp), b(**inp))


def test_integer_and_scalar_timesteps():
    model = build(TINY_V1)
    inp = inputs(TINY_V1)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        as_int = model(inp["x"], t, inp["context"])
        torch.testing.assert_close(as_int, model(inp["x"], t.float(), inp["context"]), rtol=0, atol=0)
        torch.testing.assert_close(model(inp["x"], 10, inp["context"]),
                                   model(inp["x"], torch.tensor([10.0, 10.0]), inp["context"]), rtol=0, atol=0)


# -- attention backends and precision ----------------------------------------------------------------------------
def test_sdpa_equals_math():
    model = build(TINY_V2)
    inp = inputs(TINY_V2)
    with torch.no_grad():
        sdpa = model(**inp)
        model.set_attention_backend("math")
        assert all(m.backend == "math" for m in model.modules() if isinstance(m, CrossAttention))
        math_out = model(**inp)
    assert (sdpa - math_out).abs().max().item() <= 1e-5


def test_xformers_backend_behaviour():
    try:
        import xformers.ops  # noqa: F401, PLC0415
        have_xformers = True
    except Exception:
        have_xformers = False
    if not have_xformers:
        with pytest.raises(AttentionBackendError, match="xformers.*(install|import)"):
            UNetModel(**TINY_V1, attn_backend="xformers")
        model = build(TINY_V1)
        with pytest.raises(AttentionBackendError, match="xformers"):
            model.set_attention_backend("xformers")
        assert all(m.backend == "sdpa" for m in model.modules() if isinstance(m, CrossAttention))
    else:  # installed: it either runs and agrees with sdpa, or says clearly why it cannot
        model = build(TINY_V1, attn_backend="xformers")
        inp = inputs(TINY_V1)
        try:
            with torch.no_grad():
                out = model(**inp)
        except AttentionBackendError as e:
            assert "xformers" in str(e)
        else:
            model.set_attention_backend("sdpa")
            with torch.no_grad():
                assert (out - model(**inp)).abs().max().item() <= 1e-4


def test_bf16_upcast_attention_close_to_fp32():
    model = build(TINY_V2)
    inp = inputs(TINY_V2)
    with torch.no_grad():
        ref = model(**inp)
        model.to(torch.bfloat16).set_attention_backend("math", upcast=True)
        assert all(m.upcast for m in model.modules() if isinstance(m, CrossAttention))
        up = model(**inp)  # fp32 inputs are cast at the boundary, the output comes back in fp32
        model.set_attention_backend("math", upcast=False)
        plain = model(**inp)
        low = model(**{k: v.bfloat16() if v.is_floating_point() else v for k, v in inp.items()})
    assert up.dtype == torch.float32 and low.dtype == torch.bfloat16
    assert torch.isfinite(up).all()
    assert not torch.equal(up, plain)  # the flag changes the computation
    scale = ref.abs().max().item()
    assert (up - ref).abs().max().item() <= 0.05 * scale


# -- gradient checkpointing --------------------------------------------------------------------------------------
def _train_step(model: UNetModel, inp: dict) -> tuple[dict, int, dict]:
    """Loss backward; returns grads, bytes saved for backward during forward, forward-call counts."""
    calls = {"res": 0, "attn": 0}
    res = next(m for m in model.modules() if isinstance(m, ResBlock))
    blk = next(m for m in model.modules() if isinstance(m, BasicTransformerBlock))
    hooks = [res.in_layers.register_forward_hook(lambda *_: calls.__setitem__("res", calls["res"] + 1)),
             blk.attn1.register_forward_hook(lambda *_: calls.__setitem__("attn", calls["attn"] + 1))]
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    model.train().zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**inp)
    out.square().mean().backward()
    for h in hooks:
        h.remove()
    return {k: p.grad.clone() for k, p in model.named_parameters()}, saved[0], calls


def test_gradient_checkpointing_recomputes_and_matches():
    inp = inputs(TINY_V1)
    plain = build(TINY_V1)
    ckpt = copy.deepcopy(plain)
    ckpt.set_gradient_checkpointing(True)
    g_plain, saved_plain, calls_plain = _train_step(plain, inp)
    g_ckpt, saved_ckpt, calls_ckpt = _train_step(ckpt, inp)
    assert calls_plain == {"res": 1, "attn": 1}
    assert calls_ckpt == {"res": 2, "attn": 2}  # forward re-run during backward
    assert saved_ckpt < 0.5 * saved_plain
    for k, g in g_plain.items():
        torch.testing.assert_close(g_ckpt[k], g, rtol=1e-5, atol=1e-6, msg=k)
    # the constructor flag does the same, and eval / no_grad never checkpoints
    model = build({**TINY_V1, "use_checkpoint": True})
    _, _, calls = _train_step(model, inp)
    assert calls == {"res": 2, "attn": 2}
    model.eval()
    with torch.no_grad():
        model(**inp)


# -- other options and bad input ---------------------------------------------------------------------------------
def test_other_options_shapes():
    params = {**TINY_V1, "resblock_updown": True, "conv_resample": False, "num_attention_blocks": [1, 1, 0, 0],
              "num_res_blocks": [1, 2, 1, 1], "dropout": 0.1, "num_classes": "continuous"}
    model = build(params)
    inp = inputs(params)
    out = model(**inp, y=torch.rand(2, 1))
    assert out.shape == (2, 4, 16, 16)
    # input levels 0 and 1, the middle block, output levels 1 and 0
    assert sum(isinstance(m, SpatialTransformer) for m in model.modules()) == 2 + 1 + 2
    out.mean().backward()
    t_scalar = model.eval()(inp["x"], 5, inp["context"], y=torch.rand(2, 1))
    assert t_scalar.shape == out.shape


@pytest.mark.parametrize("override, name", [
    ({"dims": 3}, "dims"),
    ({"n_embed": 16}, "n_embed"),
    ({"use_new_attention_order": True}, "use_new_attention_order"),
    ({"use_spatial_transformer": False}, "use_spatial_transformer"),
    ({"context_dim": None}, "context_dim"),
    ({"num_heads": -1}, "num_head"),
    ({"num_res_blocks": [2, 2]}, "num_res_blocks"),
    ({"disable_self_attentions": [True]}, "disable_self_attentions"),
    ({"model_channels": 48}, "model_channels"),
    ({"num_classes": "words"}, "num_classes"),
    ({"num_classes": "sequential"}, "adm_in_channels"),
    ({"transformer_depth": [1, 1]}, "transformer_depth"),
])
def test_bad_arguments_name_the_argument(override, name):
    with pytest.raises(ValueError, match=name):
        UNetModel(**{**TINY_V1, **override})


def test_bad_backend_and_bad_forward_inputs():
    with pytest.raises(AttentionBackendError, match="flash9"):
        UNetModel(**TINY_V1, attn_backend="flash9")
    model = build(TINY_V1)
    inp = inputs(TINY_V1)
    with pytest.raises(ValueError, match="timesteps"):
        model(inp["x"], torch.zeros(3), inp["context"])
    with pytest.raises(ValueError, match="x must"):
        model(inp["x"][:, :3], inp["timesteps"], inp["context"])
    with pytest.raises(ValueError, match="y must"):
        model(**inp, y=torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("bias", [True, False])
def test_split_linear_equals_one_matmul_and_chunk(bias):
    """split_linear (two matmuls over the weight's row halves) gives chunk's halves and the same gradients for x,
    weight and bias."""
    from ldm.unet.attention import split_linear

    torch.manual_seed(0)
    w = torch.randn(40, 12, dtype=torch.float64, requires_grad=True)
    b = torch.randn(40, dtype=torch.float64, requires_grad=True) if bias else None
    x = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    inputs = [x, w] + ([b] if bias else [])
    results = []
    for halves in (torch.nn.functional.linear(x, w, b).chunk(2, dim=-1), split_linear(x, w, b)):
        loss = (halves[0] * torch.nn.functional.gelu(halves[1])).square().sum()
        results.append((halves, torch.autograd.grad(loss, inputs)))
    for got, want in zip([*results[1][0], *results[1][1]], [*results[0][0], *results[0][1]]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)  # x's gradient: two sums of 20, not one of 40


def test_geglu_splits_only_in_compiled_training_graphs(monkeypatch):
    """GEGLU_SPLIT_GRAD acts in compiled graphs with gradients (the same output and gradients as one matmul);
    eager calls, inference and a LoRA-wrapped proj make the one call, so the adapter's update is not bypassed."""
    import ldm.unet.attention as attn
    from ldm.lora import LoRALinear

    torch.manual_seed(0)
    geglu = attn.GEGLU(12, 20).double()
    x = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    seen = []
    monkeypatch.setattr(attn, "_split_projection", lambda proj, f=attn._split_projection: seen.append(f(proj))
                        or seen[-1])
    results = []
    for split in (False, True):
        monkeypatch.setattr(attn, "GEGLU_SPLIT_GRAD", split)
        torch._dynamo.reset()
        y = torch.compile(geglu, backend="aot_eager")(x)
        results.append((y, torch.autograd.grad(y.square().sum(), [x, *geglu.parameters()])))
    assert seen == [False, True]
    for got, want in zip([results[1][0], *results[1][1]], [results[0][0], *results[0][1]]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    seen.clear()
    geglu(x)  # eager with gradients
    with torch.no_grad():
        torch._dynamo.reset()
        torch.compile(geglu, backend="aot_eager")(x)  # compiled inference
    lora = attn.GEGLU(12, 20).double()
    lora.proj = LoRALinear.wrap(lora.proj, rank=2, alpha=2.0)
    torch.nn.init.normal_(lora.proj.lora_B)
    torch._dynamo.reset()
    y_compiled = torch.compile(lora, backend="aot_eager")(x)
    torch._dynamo.reset()
    assert seen == [False, False, False]
    torch.testing.assert_close(y_compiled, lora(x), rtol=0, atol=1e-12)  # the adapter's update is kept
