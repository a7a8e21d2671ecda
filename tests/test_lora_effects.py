"""LoRA adapters (ldm/lora.py) and the ``train.lora`` keys: each key changes what is trained, the forward and merge
math agree with peft's LoRA on diffusers' U-Net, and a bad adapter file fails naming the file and the key."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import ldm
from ldm.checkpoint import CheckpointError, save_safetensors
from ldm.config import load_config
from ldm.lora import LoRALinear, add_lora, load_lora, lora_state_dict, merge_lora
from ldm.registry import ConfigError
from ldm.training.keys import check_run_config
from script_loader import load_script

TINY = "configs/tiny/txt2img.yaml"


def _randomise_b(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


# ------------------------------------------------------------------------------------------------ merge
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_in_half_precision_rounds_once_and_keeps_the_base_frozen(dtype) -> None:
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(64, 48).requires_grad_(False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=g).to(dtype).float())  # values exact in the half dtype
    ref = LoRALinear.wrap(lin, rank=4, alpha=11.0)  # scale 2.75, not a power of two
    with torch.no_grad():
        ref.lora_A.copy_(torch.randn(4, 64, generator=g).to(dtype).float())
        ref.lora_B.copy_((torch.randn(48, 4, generator=g) * 0.05).to(dtype).float())
    half = LoRALinear.wrap(lin.to(dtype), rank=4, alpha=11.0)
    half.load_state_dict(ref.state_dict())
    merged = half.merge()
    assert merged.weight.dtype == dtype
    assert torch.equal(merged.weight, ref.merge().weight.to(dtype))  # W + s·BA in fp32, one rounding
    assert not merged.weight.requires_grad and not merged.bias.requires_grad


# ------------------------------------------------------------------------------------------------ add_lora
def test_add_lora_targets_match_whole_dotted_names_as_peft_does() -> None:
    model = nn.ModuleDict({"attn": nn.ModuleDict({"to_q": nn.Linear(4, 4), "xto_k": nn.Linear(4, 4)})})
    assert add_lora(model, rank=2, targets=["to_q", "to_k"]) == ["attn.to_q"]  # "to_k" is no name of "xto_k"
    with pytest.raises(ValueError, match=r"LoRA targets \['q'\] matched no nn.Linear"):
        add_lora(nn.ModuleDict({"to_q": nn.Linear(4, 4)}), rank=2, targets=["q"])


@pytest.mark.parametrize("alpha, match", [(0.0, "alpha must be a finite number > 0"),
                                          (float("nan"), "alpha must be a finite number > 0")])
def test_add_lora_refuses_an_alpha_that_would_be_replaced_or_poison_the_scale(alpha, match) -> None:
    with pytest.raises(ValueError, match=match):
        add_lora(nn.ModuleDict({"to_q": nn.Linear(4, 4)}), rank=2, alpha=alpha, targets=["to_q"])


# ------------------------------------------------------------------------------------------------ load_lora
def _linear_model() -> nn.Module:
    return nn.ModuleDict({"to_q": nn.Linear(4, 6), "to_k": nn.Linear(4, 6)})


@pytest.mark.parametrize("sd, match", [
    ({"to_q.lora_A": torch.ones(2, 4)}, "to_q.lora_A has no to_q.lora_B"),
    ({"to_q.lora_A": torch.ones(2, 4), "to_q.lora_B": torch.ones(1, 2)}, r"lora_B \(1, 2\) do not fit"),
    ({"to_q.lora_A": torch.ones(2, 4), "to_q.lora_B": torch.ones(6, 3)}, r"lora_B \(6, 3\) do not fit"),
    ({"to_q.lora_A": torch.ones(2, 4), "to_q.lora_B": torch.ones(6, 2), "to_k.lora_B": torch.ones(6, 2)},
     r"\['to_k.lora_B'\]"),
    ({"to_v.lora_A": torch.ones(2, 4), "to_v.lora_B": torch.ones(6, 2)}, "no module 'to_v'"),
    ({"to_q.lora_A": torch.ones(2, 4), "to_q.lora_B": torch.ones(6, 2), "to_q.lora_scale": torch.tensor(float("inf"))},
     "to_q.lora_scale: expected one finite number"),
])
def test_load_lora_names_the_key_of_a_bad_adapter_and_leaves_the_model_alone(sd, match) -> None:
    model = _linear_model()
    with pytest.raises((KeyError, ValueError), match=match):
        load_lora(model, sd)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_load_lora_refuses_to_replace_an_attached_adapter() -> None:
    model = _linear_model()
    add_lora(model, rank=2, targets=["to_q"])
    _randomise_b(model)
    x = torch.randn(3, 4)
    before = model["to_q"](x)
    with pytest.raises(ValueError, match="'to_q' already has an adapter"):
        load_lora(model, {"to_q.lora_A": torch.ones(2, 4), "to_q.lora_B": torch.ones(6, 2)})
    torch.testing.assert_close(model["to_q"](x), before)  # the first adapter is still there


def test_ldm_load_names_the_file_of_an_adapter_without_its_b(tmp_path) -> None:
    model = ldm.load(config=TINY)
    add_lora(model.model, rank=2, targets=["attn1.to_q"])
    sd = {"model." + k: v for k, v in lora_state_dict(model.model).items() if not k.endswith("lora_B")}
    save_safetensors(sd, tmp_path / "half.safetensors")
    with pytest.raises(CheckpointError, match=r"half.safetensors: does not fit .*has no .*attn1.to_q.lora_B"):
        ldm.load(config=TINY, lora=tmp_path / "half.safetensors")


def test_saved_adapters_reload_to_the_same_output_and_merge_to_it() -> None:
    torch.manual_seed(0)
    model = ldm.load(config=TINY)
    add_lora(model.model, rank=3, alpha=5.0, targets=["to_q", "to_v", "ff.net.2", "proj_in"])
    _randomise_b(model.model)
    other = ldm.load(config=TINY)
    other.load_state_dict(model.state_dict(), strict=False)  # the same base weights
    load_lora(other.model, lora_state_dict(model.model))
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 77, 64)
    with torch.no_grad():
        y, y_loaded = model.unet(x, t, context=c), other.unet(x, t, context=c)
        merge_lora(other.model)
        y_merged = other.unet(x, t, context=c)
    torch.testing.assert_close(y_loaded, y, rtol=0, atol=0)
    torch.testing.assert_close(y_merged, y, rtol=1e-5, atol=1e-5)


def test_ldm_save_of_a_model_with_attached_adapters_loads_back_to_its_output(tmp_path, caplog) -> None:
    """``ldm.save`` wrote lora_A / lora_B beside the base weights, a file ``ldm.load`` refused (and other tools would
    run without the adapters); it now writes the merged weights, and the model keeps its adapters."""
    from ldm.lora import LoRALinear

    torch.manual_seed(0)
    model = ldm.load(config=TINY)
    add_lora(model.model, rank=2, alpha=4.0, targets=["to_q", "attn2.to_v"])
    _randomise_b(model.model)
    model.cond_stage_model.add_embedding("<thing>", torch.randn(2, model.cond_stage_model.width))
    with caplog.at_level("WARNING"):
        ldm.save(model, tmp_path / "m.safetensors")
    assert "save: the textual-inversion embeddings <thing> are not written" in caplog.text  # was silent
    back = ldm.load(tmp_path / "m.safetensors")
    assert any(isinstance(m, LoRALinear) for m in model.model.modules())  # the saved model keeps its adapters
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 77, 64)
    with torch.no_grad():
        torch.testing.assert_close(back.unet(x, t, context=c), model.unet(x, t, context=c), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ train.lora keys
def _module(*overrides: str):
    from ldm.diffusion.lightning import LatentDiffusionModule

    cfg = load_config(TINY, ["train.ema_decay=null", *overrides])
    check_run_config(cfg)
    return LatentDiffusionModule(cfg)


def test_train_lora_rank_alpha_and_targets_each_shape_what_is_trained() -> None:
    m = _module("train.lora.rank=3", "train.lora.alpha=7.5", "train.lora.targets=[attn2.to_k,ff.net.2]")
    adapted = {n: mod for n, mod in m.net.model.named_modules() if isinstance(mod, LoRALinear)}
    assert adapted and all(n.endswith(("attn2.to_k", "ff.net.2")) for n in adapted)
    assert len(adapted) == 2 * sum(n.endswith("attn2.to_k") for n in adapted)
    assert all(mod.lora_A.shape[0] == 3 and mod.scale == pytest.approx(2.5) for mod in adapted.values())
    opt = m.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt[0][0] if isinstance(opt, tuple) else opt
    trained = {id(p) for group in opt.param_groups for p in group["params"]}
    lora = {id(p) for n, p in m.net.model.named_parameters() if n.endswith(("lora_A", "lora_B"))}
    assert trained == lora  # the base U-Net is frozen: only A and B reach the optimizer
    default = _module("train.lora.rank=2")
    names = [n for n, mod in default.net.model.named_modules() if isinstance(mod, LoRALinear)]
    assert names and all(n.rsplit(".", 2)[-2] in ("attn1", "attn2", "to_out") for n in names)
    assert all(mod.scale == 1.0 for mod in default.net.model.modules() if isinstance(mod, LoRALinear))


@pytest.mark.parametrize("overrides, match", [
    (["train.lora.alpha=8"], r"train.lora.alpha set but train.lora.rank is 0"),
    (["train.lora.rank=0", "train.lora.targets=[to_q]"], r"train.lora.targets set but train.lora.rank is 0"),
    (["train.lora.rank=4", "train.lora.targets=[]"], "train.lora: expected targets to be null or a non-empty list"),
    (["train.lora.rank=4", "train.lora.targets=[1]"], "train.lora: expected targets to be null or a non-empty list"),
])
def test_train_lora_keys_that_would_do_nothing_are_refused(overrides, match) -> None:
    cfg = load_config(TINY, overrides)
    with pytest.raises(ConfigError, match=match):
        check_run_config(cfg)


def test_train_lora_targets_matching_nothing_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"train.lora: LoRA targets \['attn3.to_q'\] matched no"):
        _module("train.lora.rank=2", "train.lora.targets=[attn3.to_q]")


# ------------------------------------------------------------------------------------------------ against peft
def test_unmerged_forward_equals_peft_lora_on_the_diffusers_unet(tmp_path) -> None:
    """The same A, B and α through our LoRALinear and through peft's LoRA layers on diffusers' UNet2DConditionModel
    (the exported twin of our U-Net): the same noise prediction."""
    diffusers = pytest.importorskip("diffusers")
    peft = pytest.importorskip("peft")
    from ldm.convert import export_diffusers
    from ldm.convert.diffusers_unet import unet_keymap

    torch.manual_seed(0)
    model = ldm.load(config=TINY)
    with torch.no_grad():
        for p in model.model.parameters():
            p.normal_(0, 0.1)
    export_diffusers(model, tmp_path / "sd")
    unet = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "sd" / "unet", local_files_only=True)
    names = add_lora(model.model, rank=3, alpha=6.0, targets=["to_q", "attn2.to_v", "ff.net.2", "proj_out"])
    _randomise_b(model.model)
    km = unet_keymap(model.config.model.params.unet_config.params)
    theirs, sd = [], {}
    for n in names:
        (d,) = km.forward({n[len("diffusion_model."):] + ".weight": torch.zeros(1)}, "LoRA module")
        mod = d[: -len(".weight")]
        theirs.append(mod)
        lin = model.model.get_submodule(n)
        sd.update({f"{mod}.lora_A.weight": lin.lora_A.detach(), f"{mod}.lora_B.weight": lin.lora_B.detach()})
    cfg = peft.LoraConfig(r=3, lora_alpha=6.0, target_modules=theirs)
    peft.inject_adapter_in_model(cfg, unet)
    res = peft.set_peft_model_state_dict(unet, sd)
    assert not res.unexpected_keys
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 77, 64)
    with torch.no_grad():
        ours = model.unet(x, t, context=c)
        ref = unet(x, t, encoder_hidden_states=c).sample
        for m in unet.modules():
            if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer):
                m.enable_adapters(False)
        plain = unet(x, t, encoder_hidden_states=c).sample
    assert (ref - plain).abs().max() > 1e-2  # the adapters matter
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ to_kohya
def test_lora_to_kohya_names_the_file_and_key_of_a_bad_adapter(tmp_path, caplog) -> None:
    import json

    from omegaconf import OmegaConf

    from ldm.checkpoint import META_CONFIG

    script = load_script("convert")
    model = ldm.load(config=TINY)
    add_lora(model.model, rank=2, targets=["attn1.to_q"])
    ours = {"model." + k: v for k, v in lora_state_dict(model.model).items()}
    meta = {META_CONFIG: json.dumps(OmegaConf.to_container(model.config, resolve=True))}
    no_b = {k: v for k, v in ours.items() if not k.endswith("lora_B")}
    save_safetensors(no_b, tmp_path / "no_b.safetensors", meta)
    assert script.main(["lora-to-kohya", str(tmp_path / "no_b.safetensors"), str(tmp_path / "k.safetensors")]) == 2
    assert "no_b.safetensors: to_kohya: 'model.diffusion_model." in caplog.text and ".lora_B' beside it" in caplog.text
    bad = dict(ours, **{k: v[:, :1] for k, v in ours.items() if k.endswith("lora_B")})  # (out, 1) for r = 2
    save_safetensors(bad, tmp_path / "bad.safetensors", meta)
    assert script.main(["lora-to-kohya", str(tmp_path / "bad.safetensors"), str(tmp_path / "k.safetensors")]) == 2
    assert "bad.safetensors: to_kohya: " in caplog.text and "are not an (r, in) and (out, r) pair" in caplog.text
    peft = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 32)}
    save_safetensors(peft, tmp_path / "peft.safetensors", meta)
    assert script.main(["lora-to-kohya", str(tmp_path / "peft.safetensors"), str(tmp_path / "k.safetensors")]) == 2
    assert "peft.safetensors: to_kohya: no adapters of ours" in caplog.text and "loads as it is" in caplog.text
    assert not (tmp_path / "k.safetensors").exists()


def test_resuming_with_another_lora_alpha_or_rank_is_refused_naming_the_key(tmp_path) -> None:
    """α sets the scale α / r that the saved A and B do not carry: a resume with another alpha trained on from
    rescaled adapters without a word; another rank failed on the state dict's shapes without naming the key."""
    from ldm.cli.train import run

    def train(steps: int, rank: int, alpha: float) -> None:
        run(["--config", TINY, "--run-dir", str(tmp_path), "--resume", "auto", "train.checkpoint.every_n_steps=1",
             "train.warmup_steps=0", f"trainer.max_steps={steps}", f"train.lora.rank={rank}",
             f"train.lora.alpha={alpha}"])

    train(1, rank=2, alpha=2)
    for rank, alpha in ((2, 4), (3, 2)):
        with pytest.raises(ConfigError, match=r"--resume: train.lora is .* but the checkpoint was trained with "
                                              r"\{'rank': 2, 'alpha': 2"):
            train(2, rank, alpha)
    train(2, rank=2, alpha=2)  # the same adapters resume
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
