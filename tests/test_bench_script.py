"""scripts/bench.py on the CPU (the tiny config): it runs end to end, compares ours with diffusers on the same
weights, and rejects what it does not know. The GPU numbers themselves live in docs/BENCHMARKS.md."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # bench.py and its helpers, imported by the unit tests below


def _bench(*args: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, list[dict]]:
    out = tmp_path / "bench.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--cpu", "--out", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return proc, rows


def test_cpu_smoke_run_same_weights_and_training_rows(tmp_path):
    proc, rows = _bench("--only", "unet,train", "--train-shapes", "8x2", "--train-cl", "--train-attn", "flash",
                        "--train-cudnn-benchmark", "--train-inner", "2", "--eager-graph", "--label", "smoke (CPU)",
                        tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    by = {(r["what"], r.get("impl"), r.get("variant")): r for r in rows}
    assert by[("unet_fp32_max_abs_diff_vs_diffusers", None, None)]["value"] < 1e-4  # identical weights, same function
    for impl in ("ldm", "diffusers"):
        assert by[("unet_cfg_step_b2_8", impl, "eager")]["median_s"] > 0
    assert by[("unet_cfg_step_b2_8", "ldm", "eager_graph")]["median_s"] > 0  # ours alone (eager on a CPU)
    assert ("unet_cfg_step_b2_8", "diffusers", "eager_graph") not in by
    assert by[("unet_max_abs_diff_vs_eager", "ldm", "eager_graph")]["value"] < 1e-5
    # the training knobs name themselves in the row's variant; our attention backend is ours alone
    assert by[("train_step_bf16_latent8_b2", "ldm", "eager_cl_flash_cudnnbench")]["img_per_s"] > 0
    assert by[("train_step_bf16_latent8_b2", "diffusers", "eager_cl_cudnnbench")]["img_per_s"] > 0
    for impl, variant in (("ldm", "eager_cl_flash_cudnnbench"), ("diffusers", "eager_cl_cudnnbench")):
        b2b = by[("train_steps_back_to_back_bf16_latent8_b2", impl, variant)]  # --train-inner 2: 2 steps per rep
        assert b2b["inner"] == 2 and b2b["img_per_s"] == pytest.approx(2 / b2b["median_s"])
    assert "SUMMARY" in proc.stdout
    assert all(r["command"].startswith("python scripts/bench.py --cpu --out ") and r["label"] == "smoke (CPU)"
               for r in rows)  # every row names the process that made it


def test_a_bad_argument_ends_the_command_with_status_2_naming_it(tmp_path):
    proc, rows = _bench("--only", "unet,speed", tmp_path=tmp_path)
    assert proc.returncode == 2 and "unknown item(s) speed" in proc.stderr and rows == []


@pytest.mark.parametrize("args,message", [(["--train-shapes", "8by2"], "LATENTxBATCH"),
                                          (["--train-attn", "fast"], "unknown attention backend 'fast'"),
                                          (["--attn-train-batches", "6x4"], "--attn-train-batches"),
                                          (["--inductor", "no_such_option=1"], "no option 'no_such_option'"),
                                          (["--inductor", "max_autotune=yes"], "not a Python literal"),
                                          (["--ours-inductor", "combo=True"], "--ours-inductor: torch._inductor"),
                                          (["--candidate", "gn-fast"], "invalid choice: 'gn-fast'"),
                                          (["--px", "500"], "--px must be a positive multiple of 64"),
                                          (["--unet-calls", "ldm,ours"], "--unet-calls: unknown call(s) ours"),
                                          (["--pipeline-batches", "1,x"], "comma-separated integers, got '1,x'"),
                                          (["--pipeline-batches", "0"], "batch sizes must be positive"),
                                          (["--text", "jit"], "invalid choice: 'jit'"),
                                          (["--train-inner", "0"], "--train-inner must be at least 1, got 0"),
                                          (["--vae-stats", "shifted,fast"], "unknown statistics method(s) fast")])
def test_bad_arguments_are_named(tmp_path, capsys, args, message):
    """In this process (the command line's exit is the test above): refused before anything is built or set."""
    import bench
    from ldm.attention import AttentionBackendError

    out = tmp_path / "bench.jsonl"
    with pytest.raises((SystemExit, AttentionBackendError)) as e:
        bench.main(["--cpu", "--out", str(out), *args])
    assert message in capsys.readouterr().err + str(e.value) and not out.exists()


def test_the_decoder_is_timed_again_with_each_statistics_method_asked_for(tmp_path):
    proc, rows = _bench("--only", "vae", "--vae-stats", "shifted,partial", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    variants = [(r["impl"], r["variant"]) for r in rows if r["what"].startswith("vae_decode_")]
    assert variants == [("ldm", "eager"), ("ldm", "eager_vae-shifted"), ("ldm", "eager_vae-partial"),
                        ("diffusers", "eager")]


def test_a_decoder_copy_takes_its_statistics_method_and_leaves_the_original_alone():
    import bench

    import ldm
    from ldm.norm import GroupNorm

    vae = ldm.load(config="configs/tiny/txt2img.yaml").vae
    alt = bench.decoder_with_stats(vae.decoder, "shifted", None)
    assert {m.stats for m in alt.modules() if isinstance(m, GroupNorm)} == {"shifted"}
    assert {m.stats for m in vae.decoder.modules() if isinstance(m, GroupNorm)} != {"shifted"}
    z = torch.randn(1, vae.embed_dim, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(bench.decode_with(vae, alt, z), vae.decode(z))  # eager: the same function
    assert vae.decoder is not alt


def test_pipeline_batches_keep_their_order_and_batch8_adds_eight_once():
    import bench

    def batches(*argv):
        return bench.pipeline_batches(bench.build_parser().parse_args(argv))

    assert batches() == [1]
    assert batches("--batch8") == [1, 8]
    assert batches("--pipeline-batches", "8") == [8]
    assert batches("--pipeline-batches", "8,1", "--batch8") == [8, 1]


def test_text_encoder_modes_name_optimizes_compile_text():
    import bench

    parse = bench.build_parser().parse_args
    assert [bench.TEXT_FLAGS[parse(argv).text] for argv in ([], ["--text", "compile"], ["--text", "eager"])] == \
        ["graph", True, False]


def test_end_to_end_training_bench_runs_the_lightning_module_on_a_synthetic_cache(tmp_path):
    out = tmp_path / "e2e.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--cpu", "--profile-steps", "2",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["what"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows["synthetic_cache_s"]["command"].startswith("python scripts/bench_train.py --cpu")
    assert rows["synthetic_cache_s"]["samples"] == 32  # batch 4 × (6 timed + 2 profiled steps) on the CPU
    assert rows["train_e2e_first_step_s"]["value"] > 0 and rows["train_e2e_img_per_s"]["img_per_s"] > 0
    assert rows["train_e2e_img_per_s"]["steps"] == 4  # 6 steps, 2 of warm-up left out; the profiled ones neither
    prof = rows["train_e2e_profile"]
    assert prof["steps"] == 2 and prof["wall_ms_per_step"] > 0 and prof["gpu_kernel_ms_per_step"] == 0
    assert prof["host_ops"] and all(op["self_ms_per_step"] >= 0 for op in prof["host_ops"])
    assert any(op["name"].startswith("aten::") for op in prof["host_ops"])  # the step's own operators were recorded


def test_end_to_end_training_bench_rejects_a_warmup_as_long_as_the_run():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--cpu", "--steps", "3",
                           "--warmup", "3"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--warmup must be between 0 and --steps (3)" in proc.stderr


def test_copy_sources_counts_each_copy_once_under_the_operator_that_made_it():
    import torch
    from bench_profile import copy_sources
    from torch.profiler import ProfilerActivity, profile, record_function

    x = torch.randn(2, 8, 6, 6).to(memory_format=torch.channels_last)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(3):
            with record_function("layer_a"):
                x.contiguous()  # contiguous -> clone -> copy_: one row, counted once per call
            with record_function("layer_b"):
                x.to(torch.float64)  # to -> _to_copy: attributed past the ``aten::to`` wrapper
    rows = {(r["op"], r["called_from"]): r for r in copy_sources(prof.events(), steps=3)}
    assert set(rows) == {("aten::contiguous", "layer_a"), ("aten::_to_copy", "layer_b")}, rows
    assert all(r["calls_per_step"] == 1.0 for r in rows.values())
    assert rows[("aten::contiguous", "layer_a")]["shapes"].startswith("[[2, 8, 6, 6]")


def test_kernel_categories_name_inductors_kernels_triton_whatever_ops_they_fuse():
    from bench_profile import kernel_category

    assert kernel_category("triton_poi_fused_add_clone_convolution_native_group_norm_silu_24") == \
        "norm / elementwise (Triton)"
    assert kernel_category("triton_per_fused__softmax_3") == "norm / elementwise (Triton)"
    assert kernel_category("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize256x64x32") == \
        "convolution"
    assert kernel_category("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7") == "attention"
    assert kernel_category("nvjet_sm90_hsh_168x128_64x5_1x2_h_bz_coopA_bias_TNN") == "matmul"
    assert kernel_category("Memset (Unknown)") == "copy / layout"
    for helper in ("void cudnn::fusion::convert_dq_to_16bits<true>(void const*, void*, unsigned int)",
                   "void cudnn::fusion::compute_dot_do_o<true>(void const*, void const*, void*, void*)"):
        assert kernel_category(helper) == "attention"  # the SDPA backward's, not a convolution ("convert")


def test_timeline_counts_launches_and_the_idle_gaps_before_each_kernel():
    from types import SimpleNamespace as NS

    from bench_profile import timeline_summary

    def kernel(name, start, end, device="CUDA"):
        return NS(name=name, device_type=NS(name=device), time_range=NS(start=start, end=end))

    # two calls: conv 0-10, 2 µs gap, triton 12-15, 5 µs gap, gemm 20-30 | 10 µs gap, conv 40-50, triton 50-52
    # (overlapping the conv's end: no gap), gemm 60-70; a CPU op and a graph annotation on the GPU are left out
    events = [kernel("sm90_xmma_fprop_implicit_gemm", 0, 10), kernel("triton_poi_fused_add", 12, 15),
              kernel("nvjet_sm90_hsh_bias", 20, 30), kernel("sm90_xmma_fprop_implicit_gemm", 40, 50),
              kernel("triton_red_fused_norm", 49, 52), kernel("nvjet_sm90_hsh_bias", 60, 70),
              kernel("aten::add", 0, 100, device="CPU"), kernel("## Call CompiledFxGraph ##", 0, 70)]
    row = timeline_summary(events, steps=2)
    assert row["launches_per_call"] == 3.0
    assert row["launches_by_category"] == {"convolution": 1.0, "norm / elementwise (Triton)": 1.0, "matmul": 1.0}
    assert row["busy_ms_per_call"] == round((10 + 3 + 10 + 10 + 2 + 10) / 2 / 1000, 3)
    assert row["idle_ms_per_call"] == round((2 + 5 + 10 + 0 + 8) / 2 / 1000, 3)
    assert row["idle_ms_by_next_category"] == {"matmul": round(13 / 2 / 1000, 3), "convolution": 0.005,
                                               "norm / elementwise (Triton)": 0.001}
    assert row["median_gap_us"] == 5 and timeline_summary([], steps=1) == {}


def test_inductor_options_and_candidates_name_themselves_in_the_row_variant():
    import bench
    import bench_candidates as cand
    import torch._inductor.config as inductor_config

    was, undo, undo_train = inductor_config.coordinate_descent_tuning, None, None
    try:
        cand.set_inductor_option("coordinate_descent_tuning=True")
        assert inductor_config.coordinate_descent_tuning is True
        undo = cand.apply_candidate("mm-tune")
        undo_train = cand.apply_candidate("gn-nhwc-train")
        cand.set_ours_option("combo_kernels=True")
        assert cand.OURS_OPTIONS["combo_kernels"] is True and inductor_config.combo_kernels is not True
        net = type("Net", (), {"attn_backend": "sdpa"})()
        # the candidate tunes our compiled inference graphs alone: training and eager rows do not carry it
        assert bench.variant_suffix(net, "ldm").endswith("_coordinate_descent_tuning=True")
        assert bench.variant_suffix(net, "diffusers").endswith("_coordinate_descent_tuning=True")
        # the training candidate: our compiled training rows alone
        assert bench.variant_suffix(net, "ldm", compiled=True).endswith("_coordinate_descent_tuning=True_gnnhwctrain")
        assert bench.variant_suffix(net, "diffusers", compiled=True).endswith("_coordinate_descent_tuning=True")
        assert bench.inference_tag("compiled", "reduce-overhead").endswith(
            "_coordinate_descent_tuning=True_ours-combo_kernels=True_mmtune")
        assert bench.inference_tag("eager", "reduce-overhead").endswith("_coordinate_descent_tuning=True")
    finally:
        inductor_config.coordinate_descent_tuning = was
        cand.INDUCTOR_SET.clear()
        cand.CANDIDATES_ON.clear()
        cand.OURS_SET.clear()
        cand.OURS_OPTIONS.pop("combo_kernels", None)
        for u in (undo, undo_train):
            if u is not None:
                u()
    assert cand.OURS_OPTIONS == {}


def test_inference_rows_name_the_compile_mode_and_cudnn_benchmark_and_keep_the_eager_reference():
    import bench
    import torch

    was = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        assert bench.inference_tag("compiled", "reduce-overhead") == "compiled"
        assert bench.inference_tag("compiled", "max-autotune") == "compiled_max-autotune"
        assert bench.inference_tag("eager", "max-autotune") == "eager"  # the mode only names compiled rows
        assert bench.inference_tag("compiled", "max-autotune", "reduce-overhead") == \
            "compiled_max-autotune_diffusers-reduce-overhead"
        assert bench.inference_tag("compiled", "max-autotune", "max-autotune") == "compiled_max-autotune"
        assert bench.inference_tag("compiled", "reduce-overhead", None, "compile") == "compiled_text-compile"
        assert bench.inference_tag("eager", "reduce-overhead", None, "eager") == "eager"  # eager rows: no encoder mode
        assert bench.inference_tag("compiled", "reduce-overhead", attn="fa4") == "compiled_attn-fa4"
        assert bench.inference_tag("eager", "reduce-overhead", attn="fa4") == "eager"  # --attn: compiled rows only
        assert bench.is_reference("eager") and not bench.is_reference("eager_nchw")
        torch.backends.cudnn.benchmark = True
        label = bench.inference_tag("eager", "reduce-overhead")
        assert label == "eager_cudnnbench" and bench.is_reference(label)
        assert bench.inference_tag("compiled_denoiser", "max-autotune") == "compiled_denoiser_max-autotune_cudnnbench"
        assert not bench.is_reference(bench.inference_tag("compiled", "reduce-overhead"))
    finally:
        torch.backends.cudnn.benchmark = was


@pytest.mark.parametrize("train", [False, True])
def test_attention_rows_run_on_the_cpu_at_tiny_shapes(monkeypatch, tmp_path, train):
    import bench_kernels

    monkeypatch.setattr(bench_kernels, "ATTN_SHAPES", {"self_tiny": (16, 16, 2, 8, 2), "cross_tiny": (16, 5, 2, 8, 1)})
    out = tmp_path / "attn.jsonl"
    bench_kernels.bench_attention(out, batch=1, train=train, device="cpu")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    what = "attention_train" if train else "attention"
    ours = {r["what"]: r for r in rows if r.get("impl") == "ldm:sdpa"}
    assert set(ours) == {f"{what}_self_tiny", f"{what}_cross_tiny"}
    assert all(r["max_abs_diff"] < 2e-2 and r["median_s"] > 0 for r in ours.values())  # fp16/bf16 against math
    assert {r["sdpa_picks"] for r in ours.values()} <= {"FLASH_ATTENTION", "MATH"}  # CPU SDPA's two kernels
    total = next(r for r in rows if r["what"] == f"{what}_unet_pass_ms")["by_impl_ms"]
    assert total["ldm:sdpa"] > 0


def _conv_config(m, n, k, stages, warps):
    from types import SimpleNamespace

    return SimpleNamespace(kwargs={"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_stages=stages, num_warps=warps)


def test_conv_tune_keeps_the_measured_tiles_and_never_eight_warps():
    from bench_candidates import conv_configs_kept

    configs = [_conv_config(64, 128, 128, 4, 4), _conv_config(128, 128, 128, 3, 8), _conv_config(64, 64, 32, 2, 4),
               _conv_config(128, 64, 64, 4, 4), _conv_config(64, 128, 64, 4, 8)]
    kept = conv_configs_kept(configs)
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in kept] == [(64, 128, 128),
                                                                                               (128, 64, 64)]
    # tiles shrunk to a small problem match none: every 4-warp config is kept (8 warps miscompute, torch#173068)
    small = [_conv_config(16, 64, 16, 2, 4), _conv_config(32, 32, 16, 1, 8), _conv_config(16, 32, 16, 2, 2)]
    assert [c.num_warps for c in conv_configs_kept(small)] == [4, 2]


def test_conv_tune_candidate_narrows_inductors_conv_configs_for_our_graphs_and_undoes(monkeypatch, capsys):
    import bench_candidates as cand
    from torch._inductor.choices import InductorChoices

    offered = [_conv_config(64, 128, 128, 4, 4), _conv_config(128, 128, 128, 3, 8), _conv_config(64, 64, 32, 2, 4)]
    monkeypatch.setattr(InductorChoices, "get_conv_configs",
                        lambda self, device_type="cuda": lambda *a, **k: iter(offered))
    original = InductorChoices.get_conv_configs
    undo = cand.apply_candidate("conv-tune")
    try:
        configs = InductorChoices().get_conv_configs("cuda")(8192, 320, 2880, dtype_size=2)
        assert [c.kwargs["BLOCK_K"] for c in configs] == [128]
        assert "conv-tune: 1 of 3 convolution templates kept for (M, N, K) = (8192, 320, 2880)" in \
            capsys.readouterr().err
        assert cand.OURS_OPTIONS == {"max_autotune": True, "max_autotune_gemm_backends": "ATEN",
                                     "max_autotune_conv_backends": "ATEN,TRITON"}
    finally:
        undo()
        cand.CANDIDATES_ON.clear()
    assert InductorChoices.get_conv_configs is original and cand.OURS_OPTIONS == {}


def _mm_choice(template, m=None, n=None, k=None, stages=None, warps=None):
    from types import SimpleNamespace

    kwargs = {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "num_stages": stages, "num_warps": warps, "GROUP_M": 8}
    return SimpleNamespace(template=template, params=SimpleNamespace(to_kwargs=lambda: dict(kwargs)))


def test_mm_tune_keeps_cublas_and_the_measured_tiles_or_the_first_few():
    from bench_candidates import MM_FALLBACK, mm_choices_kept
    from torch._inductor.select_algorithm import ExternKernelChoice

    cublas, triton = object.__new__(ExternKernelChoice), object()
    choices = [_mm_choice(triton, 32, 32, 32, 2, 4), _mm_choice(cublas), _mm_choice(triton, 128, 128, 64, 3, 4),
               _mm_choice(triton, 128, 128, 64, 3, 8), _mm_choice(triton, 64, 64, 128, 5, 4)]
    kept = mm_choices_kept(choices)
    assert kept[0] is choices[1] and kept[1:] == [choices[2], choices[4]]
    shrunk = [_mm_choice(triton, 16, 16, 16, s, 2) for s in range(6)]
    assert mm_choices_kept([choices[1]] + shrunk) == [choices[1]] + shrunk[:MM_FALLBACK]


def test_tuning_candidates_compose_their_backends_and_undo_in_any_order(monkeypatch, capsys):
    import bench_candidates as cand
    from torch._inductor.choices import InductorChoices
    from torch._inductor.select_algorithm import ExternKernelChoice

    cublas, triton = object.__new__(ExternKernelChoice), object()
    offered = [_mm_choice(cublas), _mm_choice(triton, 64, 128, 64, 3, 4), _mm_choice(triton, 32, 64, 32, 2, 4)]
    monkeypatch.setattr(InductorChoices, "_finalize_template_configs", lambda self, tc, ki, t, op, *a, **k: offered)
    original = InductorChoices._finalize_template_configs
    undo_mm = cand.apply_candidate("mm-tune")
    try:
        assert cand.OURS_OPTIONS == {"max_autotune": True, "max_autotune_gemm_backends": "ATEN,TRITON",
                                     "max_autotune_conv_backends": "ATEN"}
        assert InductorChoices()._finalize_template_configs({}, None, [], "addmm") == offered[:2]
        assert "mm-tune: 2 of 3 addmm choices kept" in capsys.readouterr().err
        undo_conv = cand.apply_candidate("conv-tune")
        assert cand.OURS_OPTIONS["max_autotune_conv_backends"] == "ATEN,TRITON"
        assert cand.OURS_OPTIONS["max_autotune_gemm_backends"] == "ATEN,TRITON"
        undo_mm()
        assert cand.OURS_OPTIONS == {"max_autotune": True, "max_autotune_gemm_backends": "ATEN",
                                     "max_autotune_conv_backends": "ATEN,TRITON"}
        assert InductorChoices._finalize_template_configs is original
        undo_conv()
    finally:
        cand.CANDIDATES_ON.clear()
    assert cand.OURS_OPTIONS == {} and cand.TUNING == set()


def test_compiled_unet_rows_time_the_first_call_and_compare_with_the_eager_outputs(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import bench
    import torch

    net = torch.nn.Conv2d(4, 4, 1)
    def unet(x, t, context, repeat=1):  # repeat: the same x for `repeat` contexts
        return net(x.repeat(repeat, 1, 1, 1))

    ours = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32, unet=unet)
    pipe = SimpleNamespace(unet=lambda x, t, encoder_hidden_states: SimpleNamespace(sample=net(x)))
    pipe.unet.config = SimpleNamespace(cross_attention_dim=8)
    monkeypatch.setattr(bench, "EAGER_OUT", {})
    out = tmp_path / "rows.jsonl"
    with torch.no_grad():
        for tag in ("eager", "compiled"):
            bench.bench_unet(ours, pipe, 4, out, tag)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    first = {r["impl"]: r for r in rows if r["what"] == "unet_first_call_s_4"}
    assert set(first) == {"ldm", "diffusers", "ldm_shared_x"} and all(r["variant"] == "compiled"
                                                                      for r in first.values())
    assert all(isinstance(r["phases"], dict) for r in first.values())  # nothing compiled here: no phase ran
    diffs = [r for r in rows if r["what"] == "unet_max_abs_diff_vs_eager"]
    assert [(r["impl"], r["value"]) for r in diffs] == [("ldm", 0.0), ("diffusers", 0.0), ("ldm_shared_x", 0.0)]
    # a CFG step's inputs: both halves the same x, so sharing it changes nothing
    assert [r["value"] for r in rows if r["what"] == "unet_max_abs_diff_shared_x_vs_batched"] == [0.0, 0.0]
    assert sum(r["what"] == "unet_cfg_step_b2_4_back_to_back" for r in rows) == 6


def test_fp8_linear_quantizes_per_row_and_stays_within_e4m3_error():
    """bench_fp8's layer: per-token activation scales, per-output-channel weight scales (torch._scaled_mm also runs
    on the CPU); its error against fp32 is e4m3's (3 mantissa bits), and a row's scale follows its magnitude."""
    import torch
    import torch.nn.functional as F
    from bench_fp8 import E4M3, fp8_linear, level_linears, quantize_rows

    torch.manual_seed(0)
    x = torch.randn(64, 320)
    x[3] *= 1000.0  # one loud token must not wash out the others (a per-tensor scale would)
    w = torch.randn(960, 320) / 320**0.5
    w8, sw = quantize_rows(w)
    assert w8.dtype == E4M3 and sw.shape == (960, 1)
    assert torch.allclose(w8.float().abs().amax(dim=1), torch.full((960,), 448.0))  # each row uses e4m3's range
    y = fp8_linear(x.half(), w8, sw.t().contiguous())
    ref = F.linear(x, w)
    assert y.dtype == torch.float16 and y.shape == (64, 960)
    rel = (y.float() - ref).norm(dim=1) / ref.norm(dim=1)
    assert rel.max() < 0.08 and rel[0] < 0.08  # the quiet rows keep their precision
    assert [n for _, _, n in level_linears(320)] == [960, 320, 2560, 320]


def test_groupnorm_candidates_set_ldm_norm_and_undo():
    import bench_candidates as cand

    import ldm.norm

    default = (True, "partial", 4)
    state = lambda: (ldm.norm.NHWC_INFERENCE, ldm.norm.NHWC_STATS, ldm.norm.STATS_PARTS)  # noqa: E731
    assert state() == default
    try:
        undo_native = cand.apply_candidate("gn-native")
        undo_welford = cand.apply_candidate("gn-welford")
        assert state() == (False, "welford", 4)
        assert cand.CANDIDATES_ON == ["gn-native", "gn-welford"]
        undo_native()
        undo_welford()
        assert state() == default
        undo_eight = cand.apply_candidate("gn-partial8")  # two settings at once
        assert state() == (True, "partial", 8)
        undo_eight()
        assert state() == default
    finally:
        cand.CANDIDATES_ON.clear()
        ldm.norm.NHWC_INFERENCE, ldm.norm.NHWC_STATS, ldm.norm.STATS_PARTS = default


def test_autoencoder_candidates_set_the_statistics_of_norms_built_after_them_and_undo():
    import bench_candidates as cand
    import pytest

    import ldm.autoencoder.model as ae

    assert ae.NORM_STATS == "welford" and ae.Normalize(64).stats == "welford"
    try:
        undo = cand.apply_candidate("vae-shifted")
        assert ae.Normalize(64).stats == "shifted"  # bench.py builds the models after applying the candidates
        undo()
        assert ae.NORM_STATS == "welford"
    finally:
        cand.CANDIDATES_ON.clear()
        ae.NORM_STATS = "welford"
    with pytest.raises(AttributeError, match="ldm.autoencoder.model has no NORM_STAT"):
        cand._module_setting("ldm.autoencoder.model", NORM_STAT="shifted")()
    assert ae.NORM_STATS == "welford"


def test_compile_breakdown_names_the_phases_of_a_cold_compile_and_the_cache_hit_of_the_next(tmp_path, monkeypatch):
    import torch
    import torch._inductor.config as inductor_config
    from bench_common import compile_breakdown, compile_counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # cold: nothing from other tests

    def fn(x):
        return torch.nn.functional.silu(x) * 2 + x.mean()

    phases = []
    # (inductor's config object is patched with its own context manager: monkeypatch's undo deletes the option)
    with inductor_config.patch(fx_graph_cache=True):
        for _ in range(2):  # a cold compile, then the same graph in a fresh Dynamo: inductor's cache has it
            torch._dynamo.reset()
            before = compile_counters()
            torch.compile(fn)(torch.randn(8, 8))
            phases.append(compile_breakdown(before))
    assert inductor_config.fx_graph_cache is not None  # the option is still there for the tests after this one
    cold, cached = phases
    assert cold["fxgraph_cache_miss"] == 1 and "fxgraph_cache_hit" not in cold
    assert cold["compile"] >= cold["lowering"] > 0 and cold["dynamo_trace"] > 0
    assert cached["fxgraph_cache_hit"] == 1 and "fxgraph_cache_miss" not in cached
    assert "lowering" not in cached and cached["dynamo_trace"] > 0  # a hit still traces, but lowers nothing


def test_unet_rows_time_only_the_calls_asked_for_and_compare_what_ran(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import bench
    import torch

    net = torch.nn.Conv2d(4, 4, 1)
    seen = []

    def unet(x, t, context, repeat=1):
        seen.append(repeat)
        return net(x.repeat(repeat, 1, 1, 1))

    ours = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32, unet=unet)
    pipe = SimpleNamespace(unet=lambda x, t, encoder_hidden_states: SimpleNamespace(sample=net(x) + 1))
    pipe.unet.config = SimpleNamespace(cross_attention_dim=8)
    monkeypatch.setattr(bench, "EAGER_OUT", {})
    out = tmp_path / "rows.jsonl"
    with torch.no_grad():
        bench.bench_unet(ours, pipe, 4, out, "compiled", calls_on=("ldm_shared_x", "diffusers"))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert set(seen) == {2}  # ours ran only as guidance calls it
    assert {r["impl"] for r in rows if r["what"] == "unet_first_call_s_4"} == {"ldm_shared_x", "diffusers"}
    diff = [r for r in rows if r["what"] == "unet_max_abs_diff_vs_diffusers"]
    assert [(r["impl"], round(r["value"], 6)) for r in diff] == [("ldm_shared_x", 1.0)]
    assert not any(r["what"] == "unet_max_abs_diff_shared_x_vs_batched" for r in rows)
    assert {r["impl"] for r in rows if r["what"] == "unet_cfg_step_b2_4_back_to_back"} == {"ldm_shared_x", "diffusers"}


@pytest.mark.parametrize("line,message", [("A 0 --cpu", "positive whole number of seconds"),
                                          ("A", "expected 'LABEL LIMIT_S ARGS...'"),
                                          ("a/b 10 --cpu", "label 'a/b' must be"),
                                          ("A 10 --cpu\nA 20 --cpu", "label 'A' is used twice"),
                                          ("# only a comment", "no runs")])
def test_a_bad_plan_is_named_by_file_and_line(tmp_path, line, message):
    import bench_plan

    plan = tmp_path / "plan.txt"
    plan.write_text(line + "\n")
    with pytest.raises(bench_plan.PlanError, match=message):
        bench_plan.read_plan(plan)


def test_a_plan_runs_within_its_budget_cuts_a_run_at_its_limit_and_says_what_it_skipped(tmp_path, capsys):
    """The runner with a stand-in for bench.py (the same --label/--out contract) that writes one row, then sleeps as
    long as its first argument says."""
    import bench_plan

    script = tmp_path / "fake_bench.py"
    script.write_text("import argparse, json, time\n"
                      "p = argparse.ArgumentParser(); p.add_argument('sleep', type=float)\n"
                      "p.add_argument('--label'); p.add_argument('--out')\n"
                      "a = p.parse_args()\n"
                      "open(a.out, 'a').write(json.dumps({'label': a.label}) + '\\n')\n"
                      "time.sleep(a.sleep)\n")
    plan = tmp_path / "plan.txt"
    plan.write_text("# label, seconds, arguments\n"
                    "quick 60 0  # a whole run\n"
                    "cut 1 30\n")
    runs = bench_plan.read_plan(plan)
    assert runs == [("quick", 60, ["0"]), ("cut", 1, ["30"])]
    done = bench_plan.run_plan(runs, tmp_path / "out", total_s=120, min_s=1, script=script)
    assert done[0]["status"] == 0 and done[0]["rows"] == 1
    assert json.loads((tmp_path / "out" / "quick.jsonl").read_text()) == {"label": "quick"}
    assert done[1]["status"] == 124 and done[1]["seconds"] < 20 and done[1]["rows"] == 1  # its row kept
    capsys.readouterr()
    skipped = bench_plan.run_plan(runs, tmp_path / "late", total_s=10, min_s=30, script=script)  # too little budget
    assert [d["status"] for d in skipped] == ["skipped", "skipped"]
    assert "quick: skipped" in capsys.readouterr().out


@pytest.mark.parametrize("plan", sorted((ROOT / "scripts" / "plans").glob("*.txt")), ids=lambda p: p.name)
def test_every_plan_line_is_a_valid_bench_command(plan):
    """A plan runs on a lent GPU whose minutes are counted: a misspelt argument there costs a call, so each line's
    arguments go through bench.py's parser and its model-free checks here, and the limits fit one 10-minute call."""
    import bench
    from bench_plan import read_plan

    lines = read_plan(plan)
    assert lines, f"{plan.name}: no plan lines"
    assert sum(limit for _, limit, _ in lines) <= 600, f"{plan.name}: limits over one 600 s call"
    for label, _, args in lines:
        p = bench.build_parser()
        try:
            bench.check_args(p, p.parse_args(args))
        except SystemExit as e:
            raise AssertionError(f"{plan.name}, line {label!r}: bench.py refuses {args}") from e


def test_the_plan_check_catches_a_misspelt_item():
    import bench

    p = bench.build_parser()
    with pytest.raises(SystemExit):
        bench.check_args(p, p.parse_args(["--only", "unet_profiel"]))


def test_block_train_bench_refuses_an_unknown_variant_by_name(capsys):
    import bench_block_train

    with pytest.raises(SystemExit) as e:
        bench_block_train.main(["--cpu", "--variants", "default,fast"])
    assert e.value.code == 2 and "--variants: unknown ['fast']" in capsys.readouterr().err


def test_conv_backward_layouts_names_the_convolution_whose_gradient_cudnn_would_convert():
    """Two channels_last convolutions in a row, summed: the second's incoming gradient is the sum's expanded ones
    (no channels_last strides), so cuDNN would convert it; the first's is the second's input gradient, channels_last
    like its input, so no copy. Each call is recorded with the strides it got."""
    from bench_profile import conv_backward_layouts

    cl = torch.channels_last
    x = torch.randn(2, 8, 6, 6).to(memory_format=cl).requires_grad_()
    w1 = torch.randn(8, 8, 3, 3).to(memory_format=cl).requires_grad_()
    w2 = torch.randn(4, 8, 3, 3).to(memory_format=cl).requires_grad_()

    def loss() -> torch.Tensor:
        y = torch.nn.functional.conv2d(x, w1, padding=1)  # (2, 8, 6, 6), channels_last
        return torch.nn.functional.conv2d(y, w2, padding=1).sum()

    rows = {r["weight_shape"][0]: r for r in conv_backward_layouts(loss)}
    assert sorted(rows) == [4, 8] and all(r["calls"] == 1 for r in rows.values())
    assert rows[4]["converts"] is True and rows[4]["grad_output_stride"] == [0, 0, 0, 0]
    assert rows[8]["converts"] is False and rows[8]["grad_output_stride"] == [288, 1, 48, 8]
    assert x.grad is not None and x.grad.shape == x.shape  # the backward ran


@pytest.mark.slow  # two compiles of two ResBlocks' training step on the CPU: ~1 min
def test_block_train_bench_times_both_norm_variants_on_the_cpu(tmp_path):
    import bench_block_train

    import ldm.norm

    out = tmp_path / "block.jsonl"
    assert bench_block_train.main(["--cpu", "--batch", "2", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    steps = {r["variant"]: r["median_s"] for r in rows if r["what"] == "block_train_step"}
    layouts = next(r for r in rows if r["what"] == "conv_backward_grad_input_channels_last")
    assert layouts["real_grad_cl"] is True and layouts["traced_grad_cl"] is True  # the CPU's torch: no #171622
    assert sorted(steps) == ["default", "nhwc"] and all(s > 0 for s in steps.values())
    conv_bwd = {r["variant"]: r for r in rows if r["what"] == "block_train_conv_backward_layouts"}
    for row in conv_bwd.values():  # four convolutions, each gradient channels_last on the CPU (no copy)
        assert sum(c["calls"] for c in row["calls"]) == 4 and row["converting"] == 0
    assert ldm.norm.NHWC_TRAINING is False  # restored


def test_layout_check_refuses_channels_the_norms_cannot_group(capsys):
    import layout_check

    with pytest.raises(SystemExit) as e:
        layout_check.main(["--channels", "48"])
    assert e.value.code == 2 and "--channels must be a multiple of 32" in capsys.readouterr().err


@pytest.mark.slow  # the compiled training step of a 32-channel SD-shaped U-Net on the CPU: ~80 s on 2 cores
def test_layout_check_counts_every_convolution_backward(tmp_path):
    """Every convolution of the U-Net is differentiated once (conv_in, 2 per ResBlock, the skip 1x1s, proj_in and
    proj_out, down- and upsampling convs, conv_out: 98 at SD-1.5's structure). At these small shapes the gradients
    that still convert are channel slices of the skip concatenations' gradient (channels_last order, not dense: the
    channel stride is 1 and the pixel stride the concatenation's width), none NCHW."""
    import layout_check

    out = tmp_path / "check.jsonl"
    assert layout_check.main(["--channels", "32", "--latent", "8", "--fp32-norms", "--out", str(out)]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["calls"] == 98 and row["converting"] == sum(c["calls"] for c in row["converting_calls"])
    for c in row["converting_calls"]:
        channels, stride = c["grad_output_shape"][1], c["grad_output_stride"]
        assert stride[1] == 1 and stride[3] > channels, c
