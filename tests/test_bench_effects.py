"""What the benchmark scripts' numbers mean: FLOP counts against FlopCounterMode, the rows' arithmetic, the two U-Nets
kept identical and on equal terms, and settings a measurement must not leave behind (scripts/bench*.py)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from script_loader import load_script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # the scripts import their helpers by name

bench = load_script("bench")


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """The tiny config's model and diffusers' pipeline on the same weights, as bench.py builds them on the CPU."""
    return bench.build("configs/tiny/txt2img.yaml", "cpu", torch.float32, tmp_path_factory.mktemp("sd"))


def _gflop(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def test_flop_counts_are_flop_counter_modes_for_sd15():
    """SD-1.5's U-Net on the meta device (shapes only, seconds), attention as matmuls so that every FLOP is counted:
    the CFG step batched and with x shared, and a training step per image at both latent sides."""
    import ldm

    with torch.device("meta"):
        unet = ldm.load(config="sd/v1-inference.yaml").unet
    unet.set_attention_backend("math")
    x, t, c = torch.randn(2, 4, 64, 64), torch.tensor([500, 500]), torch.randn(2, 77, 768)
    x, t, c = (v.to("meta") for v in (x, t, c))
    with torch.no_grad():
        counted = {"unet_b2_64": _gflop(lambda: unet.eval()(x, t, context=c)),
                   "unet_shared_x_b2_64": _gflop(lambda: unet(x[:1], t[:1], context=c, repeat=2))}
    unet.train().set_gradient_checkpointing(False)
    for res in (32, 64):
        xi = torch.randn(1, 4, res, res, device="meta")

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = unet(xi, t[:1], context=c[:1])
            y.float().square().mean().backward()

        counted[f"train_img_{res}"] = _gflop(step)
        unet.zero_grad(set_to_none=True)
    assert counted == pytest.approx(bench.GFLOP, rel=2e-3)


def test_tflops_of_each_unet_call_use_its_own_flop_count(monkeypatch):
    monkeypatch.setattr(bench, "SD_SHAPES", True)
    assert bench.unet_gflop("ldm", 64) == bench.unet_gflop("diffusers", 64) == bench.GFLOP["unet_b2_64"]
    assert bench.unet_gflop("ldm_shared_x", 64) == bench.GFLOP["unet_shared_x_b2_64"] < bench.GFLOP["unet_b2_64"]
    assert bench.unet_gflop("ldm", 96) is None  # counted at 64x64 only
    monkeypatch.setattr(bench, "SD_SHAPES", False)
    assert bench.unet_gflop("ldm", 64) is None


def test_training_tflops_only_at_a_counted_latent_side(monkeypatch):
    monkeypatch.setattr(bench, "SD_SHAPES", True)
    assert bench.train_rate(16, 64, 2.0) == {"img_per_s": 8.0, "tflops": pytest.approx(8.0 * 2406.8 / 1000)}
    assert bench.train_rate(32, 32, 0.5)["tflops"] == pytest.approx(64.0 * 537.3 / 1000)
    for res in (48, 96, 128):  # e.g. --px 768 / 1024's default training shapes: no count, no rate
        assert bench.train_rate(32, res, 1.0) == {"img_per_s": 32.0, "tflops": None}


def test_an_unknown_training_impl_is_refused_by_name(capsys):
    """--train-impls ldm,ours timed diffusers' U-Net (every name but ldm) in rows named "ours"."""
    p = bench.build_parser()
    with pytest.raises(SystemExit) as e:
        bench.check_args(p, p.parse_args(["--train-impls", "ldm,ours"]))
    assert e.value.code == 2 and "--train-impls: unknown ours; known: ldm, diffusers" in capsys.readouterr().err
    assert bench.check_args(p, p.parse_args(["--train-impls", "diffusers"])) >= {"train"}


def _state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _train_args(**kw) -> SimpleNamespace:
    """bench.py's arguments that run_train_rows reads: the eager rows of both sides at latent 4, batch 2."""
    a = dict(train_attn=None, train_cudnn_benchmark=False, train_shapes="4x2", only="train",
             train_impls="ldm,diffusers", train_cl=False, train_inner=1, compile_train=False,
             compile_train_diffusers=False, compile_train_shapes=None, compile_train_diffusers_shapes=None,
             train_compile_mode=None)
    return SimpleNamespace(**(a | kw))


def test_training_rows_give_both_unets_their_weights_back(tiny_pair, tmp_path):
    """The optimizer steps of the training rows train each U-Net its own way: the inference rows after them would
    compare two different functions (their max difference went from 7e-7 to 3e-4 on the CPU)."""
    ours, pipe = tiny_pair
    before = {"ldm": _state(ours.unet), "diffusers": _state(pipe.unet)}
    bench.run_train_rows(ours, pipe, 8, True, _train_args(), tmp_path / "rows.jsonl")
    for name, net in (("ldm", ours.unet), ("diffusers", pipe.unet)):
        after = net.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before[name].items()), name
    assert ours.unet.training is False and pipe.unet.training is False


def test_each_training_row_has_the_other_unet_in_its_inference_dtype(tiny_pair, tmp_path, monkeypatch):
    """Peak memory is the process's: while one side trains, the other side's U-Net must be held as it was (fp16 on
    a GPU), not left in the fp32 of its own row, which charged diffusers' rows for our U-Net's master weights."""
    ours, pipe = tiny_pair
    dtype = lambda net: next(net.parameters()).dtype  # noqa: E731
    seen = []

    def spy(fn, *args, **kw):  # bench_train's timing: which dtype each U-Net is in while a row is timed
        seen.append((dtype(ours.unet), dtype(pipe.unet)))
        return {"median_s": 1.0, "min_s": 1.0, "max_s": 1.0, "reps": 1}

    monkeypatch.setattr(bench, "timed", spy)
    saved = {"ours": _state(ours.unet), "pipe": _state(pipe.unet)}
    ours.unet.to(torch.bfloat16)  # the inference dtype (fp16 on a GPU; bf16 here, which the CPU runs)
    pipe.unet.to(torch.bfloat16)
    try:
        bench.bench_train(ours, pipe, 4, 2, tmp_path / "rows.jsonl")
        assert seen == [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)]
        assert dtype(ours.unet) == dtype(pipe.unet) == torch.bfloat16
    finally:
        ours.unet.float().load_state_dict(saved["ours"])
        pipe.unet.float().load_state_dict(saved["pipe"])


def test_only_profile_profiles_the_training_step_not_unet_profile(tiny_pair, tmp_path, monkeypatch):
    ours, pipe = tiny_pair
    asked = []
    monkeypatch.setattr(bench, "bench_train", lambda *args, profile=False, **kw: asked.append(profile))
    bench.run_train_rows(ours, pipe, 8, True, _train_args(only="unet_profile,train"), None)
    bench.run_train_rows(ours, pipe, 8, True, _train_args(only="train,profile"), None)
    assert asked == [False, True]


def test_the_parity_check_runs_in_true_fp32_and_stops_the_run_when_the_unets_differ(tiny_pair, tmp_path):
    ours, pipe = tiny_pair
    flags = []
    hook = ours.unet.register_forward_pre_hook(
        lambda m, args: flags.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)))
    was = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as bench.py's main sets them
    out = tmp_path / "rows.jsonl"
    try:
        bench.check_same_function(ours, pipe, 8, out, torch.float32)  # the same weights: passes
        assert flags == [(False, False)]
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
        weight = pipe.unet.conv_in.weight
        with torch.no_grad():
            weight.add_(0.5)
        try:
            with pytest.raises(SystemExit, match="not the same weights"):
                bench.check_same_function(ours, pipe, 8, out, torch.float32)
        finally:
            with torch.no_grad():
                weight.sub_(0.5)
    finally:
        hook.remove()
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = was
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["value"] < 1e-5 and rows[1]["value"] > 1e-2 * rows[1]["output_abs_max"]  # both rows written


def test_the_layer_rows_leave_the_runs_cudnn_benchmark_setting(tiny_pair, tmp_path):
    """bench.py --cudnn-benchmark: the layer rows time each convolution with and without cudnn.benchmark; the variants
    after them (compiled) must still run, and be named, with the run's setting."""
    import bench_kernels

    ours, pipe = tiny_pair
    out = tmp_path / "layers.jsonl"
    was = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        bench_kernels.bench_layers(ours, pipe.unet.config.cross_attention_dim, 4, out)
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = was
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    convs = [r for r in rows if r.get("kind") == "Conv2d"]
    assert convs and all(set(r["ms"]) == {"heuristic", "benchmark"} for r in convs)
    assert all(set(r["ms"]) == {"fp16"} for r in rows if r.get("kind") == "Linear")  # no fp8 off a Hopper GPU


def test_timeline_median_gap_of_an_even_count_is_the_mean_of_the_middle_two():
    from bench_profile import timeline_summary

    def kernels(gaps):  # 1 µs kernels with these idle gaps between them
        events, start = [], 0
        for gap in (0, *gaps):
            start += gap
            events.append(SimpleNamespace(name="triton_poi_fused_add", device_type=SimpleNamespace(name="CUDA"),
                                          time_range=SimpleNamespace(start=start, end=start + 1)))
            start += 1
        return events

    row = timeline_summary(kernels([1, 3, 9, 5]), steps=1)
    assert row["median_gap_us"] == 4 and row["p90_gap_us"] == 9  # sorted 1, 3, 5, 9: 4, not 5
    assert timeline_summary(kernels(range(1, 20, 2)), steps=1)["p90_gap_us"] == 17  # nearest rank: 9th of 10


def test_a_plan_run_replaces_the_rows_an_earlier_run_left_under_its_label(tmp_path):
    import bench_plan

    script = tmp_path / "fake_bench.py"
    script.write_text("import argparse, json\n"
                      "p = argparse.ArgumentParser(); p.add_argument('--label'); p.add_argument('--out')\n"
                      "a = p.parse_args()\n"
                      "open(a.out, 'a').write(json.dumps({'label': a.label, 'new': True}) + '\\n')\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "quick.jsonl").write_text(json.dumps({"label": "quick", "new": False}) + "\n")
    done = bench_plan.run_plan([("quick", 60, [])], out, total_s=120, min_s=1, script=script)
    assert done[0]["status"] == 0 and done[0]["rows"] == 1
    assert [json.loads(line)["new"] for line in (out / "quick.jsonl").read_text().splitlines()] == [True]


@pytest.mark.parametrize("item", ["data.batch_size=2", "trainer.max_steps=3", "data.num_samples=8",
                                  "trainer.devices=2"])
def test_end_to_end_training_bench_refuses_overrides_of_what_its_rates_count(item, capsys):
    """--override data.batch_size=2 trained batches of 2 while the rows said batch 4 and counted 4 images a step."""
    bench_train = load_script("bench_train")
    with pytest.raises(SystemExit) as e:
        bench_train.main(["--cpu", "--override", item])
    key = item.partition("=")[0]
    assert e.value.code == 2 and f"--override {item}: {key} is set from" in capsys.readouterr().err


def test_the_first_step_time_holds_its_gpu_work(monkeypatch):
    """bench_train's first-step time (compile + first step) ends at a synchronize, as the steady steps start at one:
    without it some of step 0's kernels would run inside step 1's time."""
    bench_train = load_script("bench_train")
    syncs: list[int] = []
    clock = bench_train.Clock(warmup=3, steps=6, count_syncs=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for i in range(5):
        monkeypatch.setattr(torch.cuda, "synchronize", lambda i=i: syncs.append(i))
        clock._batch_start(i)
    assert syncs == [1, 3]


@pytest.mark.parametrize("flag", ["--steps", "--batch", "--res"])
def test_ddp_bench_refuses_an_empty_measurement_by_name(flag, monkeypatch, capsys):
    """``--steps 0`` left no step time to take the median of (a StatisticsError after the whole warm-up)."""
    bench_ddp = load_script("bench_ddp")
    monkeypatch.setattr(sys, "argv", ["bench_ddp.py", flag, "0"])
    with pytest.raises(SystemExit):
        bench_ddp.main()
    assert f"{flag} must be at least 1" in capsys.readouterr().err
