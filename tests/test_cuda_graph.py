"""ldm.cuda_graph.GraphedCall and optimize(compile_text="graph"): eager where a graph cannot serve (CPU inputs,
autograd), one recorded graph per input signature on a GPU, replays equal to eager and never overwrite a kept
result."""
from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cuda_stand_in import stand_in_cuda

import ldm
import ldm.cuda_graph
from ldm.cuda_graph import GraphedCall, call_signature, signature, without_autocast_cache
from ldm.fast import compile_text_encoder, graph_text_encoder, graph_unet, optimize


class Counted:
    """y = tanh(x W) + 1, counting its Python calls (a replay makes none)."""

    def __init__(self, device: str = "cpu") -> None:
        self.w = torch.randn(8, 8, generator=torch.Generator().manual_seed(0)).to(device)
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.tanh(x @ self.w) + 1


def test_cpu_inputs_and_autograd_stay_eager():
    fn = Counted()
    graphed = GraphedCall(fn, name="counted")
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(graphed(x), fn(x))
    torch.testing.assert_close(graphed(x), fn(x))  # grad enabled: eager as well
    assert fn.calls == 4 and graphed.graphs == {}


def test_the_signature_tells_apart_shape_dtype_inference_mode_and_autocast():
    x = torch.zeros(2, 3)
    base = signature(x)
    assert signature(torch.zeros(2, 4)) != base and signature(x.double()) != base
    with torch.inference_mode():
        assert signature(x) != base
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert signature(x)[-1] == torch.bfloat16
    assert signature(torch.ones(2, 3)) == base  # values do not matter


def test_a_call_signature_holds_the_structure_the_tensors_and_the_other_values():
    x, ctx = torch.zeros(2, 4, 8, 8), torch.zeros(4, 77, 16)
    base = call_signature((x, torch.zeros(2)), {"context": ctx, "repeat": 2})
    assert base == call_signature((torch.ones(2, 4, 8, 8), torch.ones(2)), {"context": ctx + 1, "repeat": 2})
    assert base != call_signature((x, torch.zeros(2)), {"context": ctx, "repeat": 1})  # another value
    assert base != call_signature((x, torch.zeros(2)), {"y": ctx, "repeat": 2})  # another keyword
    assert base != call_signature((x, torch.zeros(3)), {"context": ctx, "repeat": 2})  # another shape
    assert call_signature((x,), {"sizes": [1, 2]}) != call_signature((x,), {"sizes": [1, 3]})  # lists are structure
    assert call_signature((x,), {"ids": {1, 2}}) is None  # a set cannot key a graph: the call runs eager


def test_calls_with_several_arguments_run_eager_where_no_graph_can_serve():
    seen = []

    def fn(x, t, context=None, repeat=1):
        seen.append(repeat)
        return x * t.reshape(-1, 1) + context.sum() * repeat

    graphed = GraphedCall(fn, name="fn")
    x, t, ctx = torch.randn(2, 3), torch.randn(2), torch.randn(4, 5)
    with torch.no_grad():  # CPU tensors: eager
        torch.testing.assert_close(graphed(x, t, context=ctx, repeat=2), fn(x, t, context=ctx, repeat=2))
    assert graphed.graphs == {} and seen == [2, 2]


class StandInGraph:
    """Replays the call recorded in it by running it again into the recorded output (what a CUDA graph's replay
    amounts to), so the static-input plumbing of GraphedCall can be checked on a CPU."""

    calls: list = []  # (args, kwargs, output) of every call of the function under test

    def replay(self) -> None:
        args, kwargs, out = self.recorded
        out.copy_(StandInGraph.pure(*args, **kwargs))

    @staticmethod
    def pure(x, t, context=None, repeat=1):
        return x * t.reshape(-1, 1) + context.sum() * repeat


def test_replays_read_each_call_s_tensors_through_the_static_inputs(monkeypatch):
    StandInGraph.calls = []

    def fn(*args, **kwargs):
        out = StandInGraph.pure(*args, **kwargs)
        StandInGraph.calls.append((args, kwargs, out))
        return out

    stand_in_cuda(monkeypatch, StandInGraph, lambda: StandInGraph.calls[-1])
    graphed = GraphedCall(fn, name="fn")
    graphed.device_type = "cpu"
    calls = [(torch.randn(2, 3), torch.randn(2), torch.randn(4, 5)) for _ in range(3)]
    with torch.no_grad():
        y0 = graphed(calls[0][0], calls[0][1], context=calls[0][2], repeat=2)  # warm-up calls and the capture
        recorded = len(StandInGraph.calls)
        y1 = graphed(calls[1][0], calls[1][1], context=calls[1][2], repeat=2)  # a replay
        assert len(StandInGraph.calls) == recorded and len(graphed.graphs) == 1
        torch.testing.assert_close(y1, StandInGraph.pure(*calls[1][:2], context=calls[1][2], repeat=2))
        torch.testing.assert_close(y0, StandInGraph.pure(*calls[0][:2], context=calls[0][2], repeat=2))  # a copy
        y2 = graphed(calls[2][0], calls[2][1], context=calls[2][2], repeat=1)  # another value: another graph
        assert len(graphed.graphs) == 2
        torch.testing.assert_close(y2, StandInGraph.pure(*calls[2][:2], context=calls[2][2], repeat=1))
    args, kwargs, _ = StandInGraph.calls[-1]
    assert args[0] is not calls[2][0] and kwargs["context"] is not calls[2][2]  # recorded on copies of the inputs


def test_a_capture_drops_cublas_workspaces_before_and_after_it(monkeypatch):
    """cuBLAS's cached workspace for the capture stream, allocated inside the graph's private pool while it records,
    must not stay in torch's cache after the capture (inductor's CUDA-graph trees clear it around theirs too):
    cleared before the warm-up and after the capture, and only then."""
    events: list[str] = []
    StandInGraph.calls = []

    def fn(x, t, context=None, repeat=1):
        events.append("call")
        out = StandInGraph.pure(x, t, context=context, repeat=repeat)
        StandInGraph.calls.append(((x, t), {"context": context, "repeat": repeat}, out))
        return out

    stand_in_cuda(monkeypatch, StandInGraph, lambda: StandInGraph.calls[-1])
    capture = torch.cuda.graph

    @contextlib.contextmanager
    def logged_capture(graph):
        events.append("capture")
        with capture(graph):
            yield
        events.append("captured")

    monkeypatch.setattr(torch.cuda, "graph", logged_capture)
    monkeypatch.setattr(ldm.cuda_graph, "clear_cublas_workspaces", lambda: events.append("clear"))
    graphed = GraphedCall(fn, name="fn")
    graphed.device_type = "cpu"
    x, t, ctx = torch.randn(2, 3), torch.randn(2), torch.randn(4, 5)
    with torch.no_grad():
        graphed(x, t, context=ctx)  # warm-up calls and the capture
        graphed(x + 1, t, context=ctx)  # a replay: nothing cleared
    assert events == ["clear", "call", "call", "capture", "call", "captured", "clear"]


def test_optimize_graphs_the_eager_unet_on_request_and_the_last_call_wins():
    model = ldm.load(config="configs/tiny/txt2img.yaml")
    with pytest.raises(ValueError, match="unet_graph replays the eager U-Net.*pass compile=False"):
        optimize(model, unet_graph=True)
    kw = dict(prompts="a red apple", steps=2, height=32, width=32, seed=0, output="latent", progress=False)
    with torch.no_grad():
        ref = model.generate(**kw)
        optimize(model, compile=False, unet_graph=True)
        assert isinstance(vars(model.unet)["forward"], GraphedCall)
        assert not graph_unet(model.unet)  # not wrapped twice
        torch.testing.assert_close(model.generate(**kw), ref)  # on the CPU the wrapper runs the eager U-Net
    graphed = vars(model.unet)["forward"]
    call = ((torch.zeros(1, 4, 4, 4), torch.zeros(1)), {"context": torch.zeros(2, 77, 64), "repeat": 2})
    key = graphed.key(*call)
    model.unet.set_attention_backend("math")  # a Python setting the forward reads: another graph
    assert graphed.key(*call) != key
    model.unet.set_attention_backend("sdpa")
    assert graphed.key(*call) == key
    optimize(model, compile=False)
    assert "forward" not in vars(model.unet)


def test_recording_under_autocast_turns_its_weight_cache_off_and_keeps_its_dtype():
    with without_autocast_cache("cpu"):
        assert not torch.is_autocast_enabled("cpu")  # nothing to change without autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.is_autocast_cache_enabled()
        with without_autocast_cache("cpu"):
            assert not torch.is_autocast_cache_enabled() and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert torch.is_autocast_cache_enabled()


def test_graphs_are_dropped_when_a_parameter_is_replaced_or_moved_not_when_updated_in_place():
    model = torch.nn.Linear(8, 8)
    graphed = GraphedCall(model, name="linear", state=model.parameters)
    graphed.drop_stale_graphs()
    graphed.graphs["recorded"] = "a graph"  # as a capture would leave it
    with torch.no_grad():
        model.weight.mul_(2)  # in place: the graph reads the new values at the same address
    graphed.drop_stale_graphs()
    assert graphed.graphs == {"recorded": "a graph"}
    model.double()  # new storage for every parameter
    graphed.drop_stale_graphs()
    assert graphed.graphs == {}
    graphed.graphs["recorded"] = "a graph"
    model.weight = torch.nn.Parameter(torch.zeros(8, 8, dtype=torch.float64))  # replaced (load_state_dict(assign=True))
    graphed.drop_stale_graphs()
    assert graphed.graphs == {}


def test_optimize_graphs_the_text_encoder_once_and_rejects_an_unknown_mode():
    model = ldm.load(config="configs/tiny/txt2img.yaml")
    with torch.no_grad():
        ref = model.encode_text(["a red apple", ""])
    optimize(model, compile=False, compile_text="graph")
    enc = model.cond_stage_model
    assert isinstance(vars(enc)["encode_ids"], GraphedCall)
    with torch.no_grad():  # on the CPU the wrapper calls the eager encoder
        torch.testing.assert_close(model.encode_text(["a red apple", ""]), ref)
    optimize(model, compile=False, compile_text="graph")
    assert not isinstance(vars(enc)["encode_ids"].fn, GraphedCall)  # not wrapped twice
    compile_text_encoder(enc, backend="aot_eager")  # the last choice wins: compiled instead of graphed
    assert not isinstance(vars(enc)["encode_ids"], GraphedCall)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(["a red apple", ""]), ref, atol=1e-5, rtol=1e-5)
    assert graph_text_encoder(enc) and isinstance(vars(enc)["encode_ids"], GraphedCall)  # and back
    assert vars(enc)["encode_ids"].fn.__func__ is type(enc).encode_ids  # wrapping the eager method, not the compiled
    optimize(model, compile=False, compile_text=False)  # eager again
    assert "encode_ids" not in vars(enc)
    optimize(model, compile=False, compile_text="graph")
    with pytest.raises(ValueError, match=r"compile_text must be one of .*got 'cudagraph'"):
        optimize(model, compile=False, compile_text="cudagraph")
    with pytest.raises(ValueError, match="compile_text must be one of"):
        optimize(model, compile=False, compile_text=1)


@pytest.mark.gpu
def test_replays_equal_eager_record_once_per_shape_and_return_copies():
    fn = Counted("cuda")
    graphed = GraphedCall(fn, name="counted")
    x1, x2 = torch.randn(3, 8, device="cuda"), torch.randn(3, 8, device="cuda")
    with torch.no_grad():
        y1 = graphed(x1)  # warm-up calls and the capture
        calls = fn.calls
        y2 = graphed(x2)  # a replay: no Python call of fn
        assert fn.calls == calls and len(graphed.graphs) == 1
        torch.testing.assert_close(y1, fn(x1))  # y1 kept its values through the second replay
        torch.testing.assert_close(y2, fn(x2))
        graphed(torch.randn(5, 8, device="cuda"))  # another shape: another graph
        assert len(graphed.graphs) == 2
    w = fn.w
    graphed.state = lambda: (fn.w,)
    with torch.no_grad():
        graphed(x1)
        fn.w = w * 2  # replaced: the graphs read the old tensor, so they are recorded again
        torch.testing.assert_close(graphed(x1), torch.tanh(x1 @ (w * 2)) + 1)
        assert len(graphed.graphs) == 1


@pytest.mark.gpu
def test_graphed_text_encoder_encodes_what_the_eager_one_does():
    model = ldm.load(config="configs/tiny/txt2img.yaml", device="cuda")
    prompts = [["a red apple", ""], ["a green pear", "blurry"]]
    with torch.no_grad():
        refs = [model.encode_text(p) for p in prompts]
        optimize(model, compile=False, compile_text="graph")
        outs = [model.encode_text(p) for p in prompts]
    assert len(vars(model.cond_stage_model)["encode_ids"].graphs) == 1
    for out, ref in zip(outs, refs):  # cuBLAS may pick other algorithms under capture: fp16-level tolerance
        torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
def test_a_call_under_autocast_records_its_own_graph():
    fn = Counted("cuda")
    fn.w.requires_grad_(True)  # a leaf that autocast would cache the fp16 cast of (freed when its context ends)
    graphed = GraphedCall(fn, name="counted")
    x = torch.randn(3, 8, device="cuda")
    with torch.no_grad():
        assert graphed(x).dtype == torch.float32
        with torch.autocast("cuda", dtype=torch.float16):
            y = graphed(x)
            torch.testing.assert_close(y, fn(x), atol=1e-3, rtol=1e-3)
    assert y.dtype == torch.float16 and len(graphed.graphs) == 2
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):  # a new autocast context: the cast replayed
        torch.testing.assert_close(graphed(x), y)


@pytest.mark.gpu
def test_a_graphed_unet_replays_what_the_eager_one_computes():
    model = ldm.load(config="configs/tiny/txt2img.yaml", device="cuda", dtype=torch.float16)
    unet = model.unet
    gen = torch.Generator("cuda").manual_seed(0)
    h = dict(device="cuda", dtype=torch.float16, generator=gen)
    xs = [torch.randn(1, unet.in_channels, 16, 16, **h) for _ in range(2)]
    ts = [torch.tensor([t], device="cuda", dtype=torch.float32) for t in (10.0, 700.0)]
    with torch.no_grad():
        ctx = model.encode_text(["", "a red apple"]).half()  # (2, 77, D): guidance's [uncond; cond]
        refs = [unet(x, t, context=ctx, repeat=2) for x, t in zip(xs, ts)]
        graph_unet(unet)
        outs = [unet(x, t, context=ctx, repeat=2) for x, t in zip(xs, ts)]  # one capture, then a replay
    assert len(vars(unet)["forward"].graphs) == 1
    for out, ref in zip(outs, refs):  # kept results: the second replay did not overwrite the first
        torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)
    unet.set_attention_backend("math")  # a setting the forward reads: recorded again, not replayed stale
    with torch.no_grad():
        out = unet(xs[0], ts[0], context=ctx, repeat=2)
    assert len(vars(unet)["forward"].graphs) == 2
    torch.testing.assert_close(out, refs[0], atol=5e-3, rtol=5e-3)  # fp16 math attention against SDPA
    unet.set_attention_backend("sdpa")
    with torch.no_grad():
        kw = dict(prompts="a red apple", negative_prompts="blurry", steps=4, height=64, width=64, seed=0,
                  progress=False)
        optimize(model, compile=False, compile_text=False)  # eager
        eager = model.generate(**kw, output="latent")
        optimize(model, compile=False, compile_text=False, unet_graph=True)
        graphed = model.generate(**kw, output="latent")
    torch.testing.assert_close(graphed, eager, atol=5e-3, rtol=5e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("second", ["copy", "load"])
def test_compiled_models_replay_after_models_replayed_from_these_graphs_were_freed(second):
    """The seventeenth session's crash ("CUDA error: unspecified launch failure"): models graphed here run and are
    freed, then a model compiled with reduce-overhead runs, a second one (its deepcopy, or one loaded anew) runs, and
    the first runs again. It crashed every time before the capture dropped cuBLAS's workspaces
    (:func:`ldm.cuda_graph.cublas_workspaces_cleared`). In a process of its own: a CUDA error is sticky."""
    probe = Path(__file__).resolve().parents[1] / "scripts" / "plans" / "graph_crash_probe.py"
    run = subprocess.run([sys.executable, str(probe), "--scenario", "graphed-freed", "--second", second],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and ": same" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]


def test_a_weight_reinterpreted_at_its_old_address_records_the_graphs_again():
    """A weight converted to another dtype can land at the address it had (the caching allocator reuses blocks):
    the graphs read it with the recorded dtype's kernels, so a new dtype at the same address must drop them too."""
    w = torch.zeros(4)
    held = [w]
    graphed = GraphedCall(lambda x: x, name="fn", state=lambda: held)
    graphed.drop_stale_graphs()
    graphed.graphs = {"recorded": None}
    graphed.drop_stale_graphs()
    assert graphed.graphs == {"recorded": None}  # nothing changed: kept
    held[0] = w.view(torch.int32)  # same address, another dtype
    graphed.drop_stale_graphs()
    assert graphed.graphs == {}


def test_a_graph_per_value_of_a_python_number_is_reported(monkeypatch, caplog):
    """Each new value of a non-tensor argument (a float timestep) records and keeps another graph: the user is
    told once, when the count reaches MANY_GRAPHS, with what to do."""
    import contextlib

    from ldm.cuda_graph import MANY_GRAPHS

    class StandIn:
        def replay(self) -> None:
            pass

    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    graphed = GraphedCall(lambda x, t: x * t, name="unet")
    graphed.device_type = "cpu"
    graphed._capture = lambda leaves, spec, device: (StandIn(), [torch.zeros(2)], torch.zeros(2))
    with torch.no_grad():
        for t in range(MANY_GRAPHS + 3):
            graphed(torch.ones(2), float(t))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(graphed.graphs) == MANY_GRAPHS + 3
    assert len(warnings) == 1 and "unet" in warnings[0] and "pass a tensor" in warnings[0]
