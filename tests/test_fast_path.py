"""The fast inference path (ldm.fast): cuDNN-first attention, fused projections, compile-traceability, load defaults."""
from __future__ import annotations

import pytest
import torch

import ldm
from ldm.attention import attention
from ldm.fast import optimize
from ldm.unet.attention import CrossAttention
from ldm.unet.blocks import ResBlock
from test_unet import TINY_V1, TINY_V2, VARIANTS, build, inputs


@pytest.mark.parametrize("backend", ["cudnn", "flash"])
def test_priority_backend_equals_math_and_falls_back_on_cpu(backend):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 8, generator=g) for n in (16, 7, 7))
    ref = attention(q, k, v, backend="math")
    assert (attention(q, k, v, backend=backend) - ref).abs().max() < 1e-5


@pytest.mark.parametrize("params", [TINY_V1, TINY_V2], ids=["v1", "v2-linear"])
def test_fused_projections_same_output_same_state_dict(params):
    model = build(params)
    inp = inputs(params)
    keys = set(model.state_dict())
    with torch.no_grad():
        ref = model(**inp)
        model.fuse_projections()
        fused = model(**inp)
    attn = [m for m in model.modules() if isinstance(m, CrossAttention)]
    selfs, cross = [m for m in attn if m.is_self_attention], [m for m in attn if not m.is_self_attention]
    assert selfs and all(m.fused_weight.shape[0] == 3 * m.to_k.weight.shape[0] for m in selfs)  # [W_Q; W_K; W_V]
    # cross-attentions keep no [W_K; W_V] of their own: the U-Net's hoisted matmul computes their K and V
    assert cross and all(m.hoist_index is not None and m.fused_weight is None for m in cross)
    assert set(model.state_dict()) == keys  # nothing new saved
    assert (fused - ref).abs().max() < 1e-5
    with torch.no_grad():
        model.hoist_conditioning(False)  # the cross-attentions project K and V themselves again, fused
        assert all(m.hoist_index is None and m.fused_weight.shape[0] == 2 * m.to_k.weight.shape[0] for m in cross)
        assert (model(**inp) - ref).abs().max() < 1e-5
        model.fuse_projections()
    model.train()
    with pytest.raises(RuntimeError, match="fuse_projections\\(False\\) before training"):
        model(**inp)
    model.fuse_projections(False)
    model(**inp)  # trains again


def test_fused_weight_follows_dtype_and_is_rebuilt_from_new_weights():
    model = build(TINY_V1)
    model.fuse_projections()
    model.to(torch.bfloat16)
    m = next(m for m in model.modules() if isinstance(m, CrossAttention) and m.is_self_attention)
    assert m.fused_weight.dtype == torch.bfloat16
    with torch.no_grad():
        m.to_q.weight.add_(1.0)
    model.fuse_projections()
    assert torch.equal(m.fused_weight[: m.to_q.weight.shape[0]], m.to_q.weight)


def test_cudnn_attention_and_fused_projections_trace_into_one_graph():
    """fullgraph=True: the sdpa_kernel priority context and the fused matmul compile without graph breaks."""
    model = build(TINY_V2)
    inp = inputs(TINY_V2)
    with torch.no_grad():
        ref = model(**inp)
        model.set_attention_backend("cudnn")
        model.fuse_projections()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        out = compiled(**inp)
    assert (out - ref).abs().max() < 1e-5


def test_optimize_without_compile_and_load_defaults(tmp_path):
    model = ldm.load(config="configs/tiny/txt2img.yaml")
    optimize(model, compile=False, attention="cudnn")
    assert model.unet.attn_backend == "cudnn"
    assert all(m.backend == "cudnn" for m in model.unet.modules() if isinstance(m, CrossAttention))
    assert all((m.fused_weight is not None) == m.is_self_attention  # cross-attention K/V: hoisted
               for m in model.unet.modules() if isinstance(m, CrossAttention))
    x = model.generate(["a red apple"], steps=2, height=32, width=32, seed=0, output="tensor", progress=False)
    assert x.shape == (1, 3, 32, 32) and torch.isfinite(x).all()
    plain = ldm.load(config="configs/tiny/txt2img.yaml", device="cpu")
    assert plain.unet.attn_backend == "sdpa" and plain.unet.input_blocks[0][0].weight.is_contiguous()  # CPU: as built
    from ldm.loading import _fast_defaults

    _fast_defaults(plain)  # what ldm.load(device="cuda") adds
    conv = plain.unet.input_blocks[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


def test_lora_adapted_projections_are_not_fused(caplog):
    """Fusing would drop the adapters' update: such modules stay unfused (with a warning), the output is unchanged."""
    from ldm.lora import add_lora

    model = build(TINY_V1)
    add_lora(model, rank=2)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # zero-initialised: give the adapters an effect
            torch.nn.init.normal_(p, std=0.5)
    inp = inputs(TINY_V1)
    with torch.no_grad():
        ref = model(**inp)
        model.fuse_projections()
        out = model(**inp)
    assert (out - ref).abs().max() < 1e-6
    assert all(m.fused_weight is None for m in model.modules() if isinstance(m, CrossAttention))
    assert "stay unfused" in caplog.text


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_compiled_guided_denoiser_matches_eager_in_one_graph(sampler):
    """scope="denoiser": D_cfg (CFG batch, σ scalings, t(σ), U-Net, guidance) traces into one graph without breaks
    (fullgraph), compiles once for every step and every later call, and samples what the eager path samples — also
    with a multistep sampler, which keeps the previous x̂0 (the compiled output is a copy)."""
    from torch._dynamo.utils import counters

    kw = dict(sampler=sampler, steps=4, height=32, width=32, seed=0, output="latent", progress=False)
    model = ldm.load(config="configs/tiny/txt2img.yaml")
    with torch.no_grad():  # untrained: give the zero-initialised layers weights, so that the prompt matters
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.05)
    ref, ref2 = (model.generate([prompt], **kw) for prompt in ("a red apple", "a green pear"))
    ref3 = model.generate(["a red apple"], guidance=3.0, **kw)
    assert not torch.equal(ref, ref2) and not torch.equal(ref, ref3)
    torch._dynamo.reset()
    counters.clear()
    optimize(model, backend="aot_eager", scope="denoiser", fuse_projections=False, compile_text=False)
    out = model.generate(["a red apple"], **kw)
    again = model.generate(["a green pear"], **kw)  # new prompt, same shapes: no recompile
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # the guided denoiser (U-Net inlined)
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-4)  # aot_eager decomposes ops: float32 rounding
    torch.testing.assert_close(again, ref2, atol=1e-3, rtol=1e-4)
    # another guidance weight: traced as a constant, so a second graph (never a CUDA graph recorded with 7.5)
    weak = model.generate(["a red apple"], guidance=3.0, **kw)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    torch.testing.assert_close(weak, ref3, atol=1e-3, rtol=1e-4)


def test_compiled_text_encoder_traces_into_one_graph_and_keeps_each_calls_output():
    """The text encoder compiles into one graph (token ids already on the device: no host tensor, so a CUDA graph
    on a GPU), once for every prompt batch of that size, encodes what the eager one does, and returns copies:
    a context kept from an earlier call is not overwritten by the next (as a CUDA graph's output would be)."""
    from torch._dynamo.utils import counters

    from ldm.fast import compile_text_encoder

    model = ldm.load(config="configs/tiny/txt2img.yaml")
    ref = model.encode_text(["a red apple", ""])
    ref2 = model.encode_text(["a green pear", "blurry"])
    torch._dynamo.reset()
    counters.clear()
    assert compile_text_encoder(model.cond_stage_model, backend="aot_eager", fullgraph=True)
    out = model.encode_text(["a red apple", ""])
    out2 = model.encode_text(["a green pear", "blurry"])
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["stats"])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out2, ref2, atol=1e-5, rtol=1e-5)  # out was not overwritten by the second call
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert compile_text_encoder(model.cond_stage_model, backend="aot_eager")  # twice: no second wrapper
    assert compile_text_encoder(object(), backend="aot_eager") is False  # an encoder without encode_ids: eager


def test_generate_encodes_both_branches_in_one_text_encoder_call(monkeypatch):
    """One batched call for prompts and negative prompts, which encodes each prompt as its own call would."""
    model = ldm.load(config="configs/tiny/txt2img.yaml")
    calls = []
    encode = model.encode_text
    monkeypatch.setattr(model, "encode_text", lambda prompts: calls.append(list(prompts)) or encode(prompts))
    model.generate(["a red apple", "a pear"], negative_prompts=["", "blurry"], steps=1, height=32, width=32,
                   output="latent", progress=False)
    assert calls == [["a red apple", "a pear", "", "blurry"]]
    both = encode(["a red apple", "a pear", "", "blurry"])
    torch.testing.assert_close(both[:2], encode(["a red apple", "a pear"]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(both[2:], encode(["", "blurry"]), atol=1e-5, rtol=1e-4)


def test_optimize_rejects_an_unknown_scope():
    with pytest.raises(ValueError, match="scope"):
        optimize(ldm.load(config="configs/tiny/txt2img.yaml"), scope="pipeline")


def test_optimize_compiles_with_cuda_graphs_by_default_not_with_minutes_of_autotuning(monkeypatch):
    """The default mode is the measured one (reduce-overhead, ~35 s of compile on an H200); max-autotune's first
    compile of the SD U-Net took over 20 minutes there (docs/BENCHMARKS.md)."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(kw) or fn)
    model = optimize(ldm.load(config="configs/tiny/txt2img.yaml"), fuse_projections=False, inductor_flags=False)
    assert [kw["mode"] for kw in calls] == ["reduce-overhead"] * 2  # the U-Net, the decoder
    assert all(kw["fullgraph"] and kw["backend"] == "inductor" for kw in calls)
    from ldm.cuda_graph import GraphedCall  # the text encoder: replayed from a CUDA graph, nothing to compile

    assert isinstance(vars(model.cond_stage_model)["encode_ids"], GraphedCall)
    calls.clear()
    optimize(ldm.load(config="configs/tiny/txt2img.yaml"), fuse_projections=False, inductor_flags=False,
             compile_text=True)
    assert [kw["mode"] for kw in calls] == ["reduce-overhead"] * 3  # and the text encoder


def test_optimize_options_are_inductor_settings_for_its_own_graphs_on_top_of_the_mode(monkeypatch):
    """torch.compile takes a mode or options, not both: options carry the mode's own settings (CUDA graphs for
    reduce-overhead) under the caller's, so these graphs can be autotuned while another model's are not."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(kw) or fn)
    optimize(ldm.load(config="configs/tiny/txt2img.yaml"), fuse_projections=False, inductor_flags=False,
             options={"max_autotune": True, "max_autotune_gemm_backends": "ATEN"}, compile_text=True)
    assert len(calls) == 3 and all("mode" not in kw for kw in calls)  # U-Net, decoder, text encoder
    assert calls[0]["options"] == {"triton.cudagraphs": True, "max_autotune": True,
                                   "max_autotune_gemm_backends": "ATEN"}
    with pytest.raises(ValueError, match="backend 'aot_eager' takes none"):
        optimize(ldm.load(config="configs/tiny/txt2img.yaml"), backend="aot_eager", options={"max_autotune": True})


def test_the_unet_graph_gets_its_own_inductor_settings_under_the_callers(monkeypatch):
    """UNET_INDUCTOR_OPTIONS (GroupNorm statistics unsplit, measured faster for the SD-1.5 step) reach the U-Net's
    graph alone, on top of the mode's; the decoder and the text encoder keep the mode; the caller's options win."""
    from ldm.fast import UNET_INDUCTOR_OPTIONS

    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append((fn.__self__, kw)) or fn)
    model = ldm.load(config="configs/tiny/txt2img.yaml")
    optimize(model, fuse_projections=False, compile_text=True)
    by_module = {type(owner).__name__: kw for owner, kw in calls}
    assert by_module["UNetModel"]["options"] == {"triton.cudagraphs": True, **UNET_INDUCTOR_OPTIONS}
    assert "mode" not in by_module["UNetModel"]
    assert by_module["Decoder"]["mode"] == by_module["OpenCLIPTextEncoder"]["mode"] == "reduce-overhead"
    calls.clear()
    optimize(ldm.load(config="configs/tiny/txt2img.yaml"), fuse_projections=False,
             options={"split_reductions": True})
    assert calls[0][1]["options"]["split_reductions"] is True


def test_optimize_options_reach_inductor_which_rejects_an_unknown_one():
    with pytest.raises(RuntimeError, match="no_such_setting"):
        optimize(ldm.load(config="configs/tiny/txt2img.yaml"), fuse_projections=False, inductor_flags=False,
                 options={"no_such_setting": 1})


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hoisted_conditioning_projections_give_the_same_output(variant):
    """One matmul for every ResBlock's time projection and one for every cross-attention's K/V: the output of
    each U-Net variant (scale-shift ResBlocks, cross-attention-only first attention, class embeddings) is the
    unfused one."""
    params, _ = VARIANTS[variant]
    model = build(params)
    inp = inputs(params)
    with torch.no_grad():
        ref = model(**inp)
        model.fuse_projections()
        out = model(**inp)
    res = [m for m in model.modules() if isinstance(m, ResBlock)]
    cross = [m for m in model.modules() if isinstance(m, CrossAttention) and not m.is_self_attention]
    assert [m.hoist_index for m in res] == list(range(len(res)))
    assert [m.hoist_index for m in cross] == list(range(len(cross)))
    assert model.hoist_emb_weight.shape == (sum(m.emb_layers[1].out_features for m in res), model.time_embed_dim)
    assert model.hoist_kv_weight.shape == (sum(2 * m.to_k.out_features for m in cross), params["context_dim"])
    assert (out - ref).abs().max() < 1e-5
    model.fuse_projections(False)
    assert model.hoist_emb_weight is None and all(m.hoist_index is None for m in res + cross)


def test_hoisting_leaves_adapted_projections_in_their_blocks_and_follows_dtype():
    from ldm.lora import LoRALinear, add_lora

    model = build(TINY_V1)
    inp = inputs(TINY_V1)
    add_lora(model, rank=2, targets=("attn2.to_k", "input_blocks.1.0.emb_layers.1"))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_()  # a nonzero update, so a lost adapter would show
        ref = model(**inp)
        model.fuse_projections()
        out = model(**inp)
    adapted = model.input_blocks[1][0]
    res = [m for m in model.modules() if isinstance(m, ResBlock)]
    assert adapted.hoist_index is None and [m.hoist_index for m in res if m is not adapted] == list(range(len(res) - 1))
    assert model.hoist_kv_weight is None  # every cross-attention's to_k is adapted
    assert (out - ref).abs().max() < 1e-5
    model = build(TINY_V1)
    model.fuse_projections()
    model.to(torch.bfloat16)
    assert model.hoist_emb_weight.dtype == model.hoist_kv_weight.dtype == torch.bfloat16


@pytest.mark.parametrize("target", ["attn2.to_k", "attn1.to_q", "input_blocks.1.0.emb_layers.1"])
def test_an_adapter_attached_after_fusing_is_an_error_until_fused_again(target):
    """Fused and hoisted weights are copies: an adapter attached afterwards would be bypassed without a word."""
    from ldm.lora import LoRALinear, add_lora

    model = build(TINY_V1)
    inp = inputs(TINY_V1)
    model.fuse_projections()
    add_lora(model, rank=2, targets=(target,))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_()
        with pytest.raises(RuntimeError, match="after fuse_projections"):
            model(**inp)
        model.fuse_projections()  # the adapted modules now keep their own projections
        out = model(**inp)
        model.fuse_projections(False)
        assert (out - model(**inp)).abs().max() < 1e-5


def _linear_calls(model, inp) -> int:
    """Linear layers in the graph that dynamo captures of one U-Net call (fullgraph)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(**inp)
    linear = torch.nn.functional.linear
    return sum(n.op == "call_function" and n.target is linear for g in graphs for n in g.graph.nodes)


def test_hoisting_leaves_one_matmul_for_all_time_projections_and_one_for_all_cross_attention_kv():
    model = build(TINY_V1)
    inp = inputs(TINY_V1)
    model.fuse_projections()
    hoisted = _linear_calls(model, inp)
    model.hoist_conditioning(False)  # q/k/v still fused, conditioning projections back in their blocks
    in_blocks = _linear_calls(model, inp)
    n_res = sum(isinstance(m, ResBlock) for m in model.modules())
    n_cross = sum(isinstance(m, CrossAttention) and not m.is_self_attention for m in model.modules())
    assert n_res > 10 and n_cross > 5
    assert in_blocks - hoisted == (n_res - 1) + (n_cross - 1)


def _shared_and_repeated(params: dict, g: int = 2) -> tuple[dict, dict]:
    """Inputs of forward(..., repeat=g): x, t, y of B = 2 items, g contexts each; and the same call spelled out."""
    inp = inputs(params)
    ctx = torch.cat([inputs(params, seed=s)["context"] for s in range(1, g + 1)])  # (g·B, L, D)
    shared = {**inp, "context": ctx, "repeat": g}
    spelled = {k: v.repeat(g, *([1] * (v.ndim - 1))) for k, v in inp.items()}
    return shared, {**spelled, "context": ctx}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_repeat_shares_x_among_contexts_and_equals_the_repeated_batch(variant, fused):
    """repeat=G (classifier-free guidance: G = 2) runs the layers before the first context reader once; the output
    is the repeated batch's, on every variant (cross-attention-only first level, FiLM ResBlocks, adm vectors, two
    transformer layers), with hoisted conditioning or without, for G = 2 and 3."""
    params, _ = VARIANTS[variant]
    model = build(params)
    if fused:
        model.fuse_projections()
    for g in (2, 3):
        shared, spelled = _shared_and_repeated(params, g)
        with torch.no_grad():
            out, ref = model(**shared), model(**spelled)
        assert out.shape == ref.shape == (g * 2, params["out_channels"], *shared["x"].shape[-2:])
        assert (out - ref).abs().max() < 1e-5 * max(1.0, ref.abs().max().item())


def test_repeat_runs_the_shared_prefix_at_batch_b_and_traces_into_one_graph():
    model = build(TINY_V1)
    model.fuse_projections()
    shared, spelled = _shared_and_repeated(TINY_V1)
    seen: dict[str, int] = {}
    first = model.input_blocks[1][0]  # the ResBlock before the first transformer: shared
    attn1 = model.input_blocks[1][1].transformer_blocks[0].attn1  # the first self-attention: shared
    attn2 = model.input_blocks[1][1].transformer_blocks[0].attn2  # reads the context: per context
    for name, mod in (("res", first), ("attn1", attn1), ("attn2", attn2)):
        mod.register_forward_hook(lambda m, a, o, name=name: seen.__setitem__(name, o.shape[0]))
    with torch.no_grad():
        ref = model(**spelled)
        assert seen == {"res": 4, "attn1": 4, "attn2": 4}
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        out = compiled(**shared)
        model(**shared)
    assert seen == {"res": 2, "attn1": 2, "attn2": 4}
    assert (out - ref).abs().max() < 1e-5


def test_repeat_batch_keeps_the_memory_format_of_a_channels_last_skip():
    from ldm.unet.blocks import repeat_batch

    h = torch.randn(2, 8, 4, 4).to(memory_format=torch.channels_last)
    r = repeat_batch(h, 6)
    assert r.is_contiguous(memory_format=torch.channels_last) and r.shape == (6, 8, 4, 4)
    assert torch.equal(r, torch.cat([h, h, h])) and repeat_batch(h, 2) is h


@pytest.mark.parametrize("kwargs,message", [
    (dict(repeat=0), "repeat must be a positive int"),
    (dict(repeat=2), "context has batch size 2, expected 4"),
    (dict(repeat=2, context=None), "needs a context"),
])
def test_repeat_rejects_what_it_cannot_share(kwargs, message):
    model = build(TINY_V1)
    with pytest.raises(ValueError, match=message):
        model(**{**inputs(TINY_V1), **kwargs})
