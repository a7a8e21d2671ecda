"""The fast inference path: half precision, channels_last, fused attention projections, inductor settings for
convolution networks, ``torch.compile``.

Attention stays on PyTorch's SDPA dispatch: on an H200 with torch 2.11 it already runs cuDNN's fused kernel (the
fastest of the card's three at the U-Net's shapes, docs/BENCHMARKS.md); the ``"cudnn"`` backend forces that order on
builds that pick flash first, at 25–60 µs of Python per call in eager mode (free once compiled).

``optimize(model)`` is opt-in and changes no saved weight (the fused projections are non-persistent buffers);
outputs stay within fp16 tolerance of the eager path (scripts/bench.py measures the difference next to the speed).
Compile artefacts go to inductor's on-disk cache (``TORCHINDUCTOR_CACHE_DIR``, default under /tmp), so a second
process with the same shapes pays much less compile time.

A copy of an optimized model (``copy.deepcopy``: an EMA or evaluation copy; pickle) is optimized the same way and
computes with its own weights: its compiled methods (:class:`CompiledCall`) are compiled again for the copy at its
first call (``torch.compile``'s function holds the original's method: a copy that kept it ran the original's
weights), its CUDA-graph wrappers record their own graphs (:class:`ldm.cuda_graph.GraphedCall`), and what
``optimize`` compiled travels with the model, so that a later ``optimize`` or :func:`uncompile` of the copy takes it
off.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import logging
from typing import Any, Callable, Iterable

import torch

from ldm.autotune import guard_conv_templates

log = logging.getLogger(__name__)

# Inductor settings for convolution-heavy U-Nets: 1×1 convolutions (the transformers' proj_in/proj_out, the
# ResBlocks' skip projections) as matmuls, fusable with their epilogues. (The diffusers guide adds
# coordinate-descent tuning, which costs minutes of compile time for a few per cent: pass it in ``flags`` to try.)
INDUCTOR_FLAGS = {"conv_1x1_as_mm": True}
# Inductor settings for the U-Net's graph alone (with ``inductor_flags``; ``options`` override them). Each GroupNorm's
# statistics as one reduction kernel per (sample, group) rather than split across kernels: the SD-1.5 step at 64×64
# launched ~600 kernels, 290 of them for its 61 GroupNorms, and ran 6.01 ms against 6.12 with split reductions
# (H200, docs/BENCHMARKS.md, 2026-12-03). Not for the decoder, whose groups at 512 px hold 1 M values each.
UNET_INDUCTOR_OPTIONS: dict[str, Any] = {"split_reductions": False}


def set_inductor_flags(flags: dict[str, Any] | None = None) -> None:
    """Apply :data:`INDUCTOR_FLAGS` (or ``flags``) to ``torch._inductor.config``: process-wide, read at compile."""
    import torch._inductor.config as cfg

    for k, v in (INDUCTOR_FLAGS if flags is None else flags).items():
        if not hasattr(cfg, k):
            log.warning("torch._inductor.config has no %r in torch %s; skipped", k, torch.__version__)
            continue
        setattr(cfg, k, v)


SCOPES = ("unet", "denoiser")
TEXT_MODES = (True, False, "graph")  # optimize(compile_text=...): inductor, eager, eager replayed from a CUDA graph


# torch.compile mode of the fast path: CUDA graphs over inductor's default kernels. "max-autotune" was measured on an
# H200 (docs/BENCHMARKS.md, fourth 11-29 session): it benchmarks ~20 Triton templates against cuDNN/cuBLAS for each
# of the SD U-Net's ~60 convolution and matmul shapes, 5-41 s each, so its first compile took over 20 minutes; narrowed
# to 4-7 choices, it compiled, and the step ran slower than with cuDNN and cuBLAS (fifth 11-29 session).
DEFAULT_MODE = "reduce-overhead"

# The model's attribute (a plain one, outside the module tree) listing what ``optimize`` compiled on it: (object,
# attribute, the CompiledCall put there), so that the next call can take them off (the last call wins: compiled again
# with its settings, graphed, or eager). On the model, not in a registry beside it, so that a copy of the model
# (copy.deepcopy, pickle) lists its own objects and wrappers.
COMPILED_ATTR = "_fast_compiled"


class CompiledCall:
    """``torch.compile`` of the method ``fn`` of an object, put on that object in its place (an instance attribute
    of the same name). ``clone``: return a copy of each output (a CUDA graph's is overwritten by its next replay,
    and callers keep results across calls); ``context``: a context-manager factory entered around each call.

    A copy (``copy.deepcopy``, pickle) holds the copy's own method (a bound method follows the object it is copied
    with) and compiles it again, lazily, at its first call: the compiled function is left behind, as it calls the
    original's method (``copy.deepcopy`` keeps functions as they are, so the copy ran the original's weights)."""

    def __init__(self, fn: Callable[..., Any], compile_kwargs: dict[str, Any], clone: bool = False,
                 context: Callable[[], Any] | None = None) -> None:
        self.fn, self.compile_kwargs, self.clone, self.context = fn, dict(compile_kwargs), clone, context
        self.compiled = torch.compile(fn, **self.compile_kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with (self.context or contextlib.nullcontext)():
            out = self.compiled(*args, **kwargs)
        return out.clone() if self.clone else out

    def __getstate__(self) -> dict[str, Any]:
        state = dict(vars(self))
        del state["compiled"]  # calls the original's method: compiled again for the copy's
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        vars(self).update(state)
        self.compiled = torch.compile(self.fn, **self.compile_kwargs)


def optimize(model: Any, compile: bool = True, mode: str | None = DEFAULT_MODE,
             fullgraph: bool = True, dynamic: bool = False, attention: str | None = None,
             fuse_projections: bool = True, inductor_flags: bool = True, scope: str = "unet",
             backend: str = "inductor", options: dict[str, Any] | None = None,
             compile_text: bool | str = "graph", unet_graph: bool = False) -> Any:
    """Prepare a loaded :class:`ldm.model.LatentDiffusion` for fast sampling on a GPU.

    - U-Net and autoencoder in ``channels_last`` (the layout cuDNN's fast convolutions want);
    - ``attention``: switch the U-Net's attention backend (default: keep the config's);
    - ``fuse_projections``: q/k/v projections as one matmul, and the conditioning's projections (every ResBlock's
      time projection, every cross-attention's K/V) as one matmul each per U-Net call (inference only: undo
      before training);
    - ``inductor_flags``: :data:`INDUCTOR_FLAGS` (process-wide) and :data:`UNET_INDUCTOR_OPTIONS` (the U-Net's
      graph);
    - ``torch.compile`` of the U-Net forward and the autoencoder decoder (``mode``: any torch.compile mode; the
      default "reduce-overhead" adds CUDA graphs for the fixed-shape denoising loop, ~35 s of compile on the first
      call; see :data:`DEFAULT_MODE` for "max-autotune"; ``backend``: a torch.compile backend, ``mode`` applies to
      inductor only; ``options``: inductor settings for these graphs alone, on top of the mode's, where
      :func:`set_inductor_flags` sets them for the whole process);
    - ``compile_text``: the text encoder's transformer, whose ~150 small kernels per prompt batch wait on Python
      when eager. ``"graph"`` (the default): its eager kernels replayed from a CUDA graph per prompt-batch shape
      (:func:`graph_text_encoder`; on an H200, SD-1.5: the same txt2img time as compiling it, and a first call
      ~12 s shorter); True: compiled with the U-Net's mode (:func:`compile_text_encoder`); False: eager;
    - ``unet_graph`` (with ``compile=False``): the eager U-Net replayed from a CUDA graph per input shape
      (:func:`graph_unet`): no compile time, and the ~1,000 kernel launches of an SD step cost one graph launch, where
      eager sampling at batch 1 is bound by the host launching them. SD-1.5 txt2img (512 px, 50 steps, batch 1) on
      an H200: 0.515 s against 1.684 s eager and 1.903 s for diffusers eager, the same latents (max |Δ| 0;
      docs/BENCHMARKS.md, 2026-12-05). ``scripts/sample.py`` uses it by default on a GPU without ``--compile``;
      here it stays opt-in, as each new input shape records (and keeps) one more graph;
    - ``scope="denoiser"``: also compile the guided denoiser D_cfg(x, σ) that ``generate`` calls once per step (the
      CFG batch and combination, the σ scalings and t(σ) around the U-Net), so a step is one graph (one CUDA-graph
      replay with "reduce-overhead") instead of the U-Net's graph plus ~40 small eager operations. Measured no
      faster on an H200 (docs/BENCHMARKS.md), so the default stays "unet".
    Called again on the same model, the last call decides: what an earlier call compiled or graphed is taken off
    first (:func:`uncompile`), then compiled with this call's settings, graphed, or left eager.
    Returns the same model object.
    """
    if scope not in SCOPES:
        raise ValueError(f"optimize: scope must be one of {SCOPES}, got {scope!r}")
    if not isinstance(compile_text, (bool, str)) or compile_text not in TEXT_MODES:
        raise ValueError(f"optimize: compile_text must be one of {TEXT_MODES}, got {compile_text!r}")
    if unet_graph and compile:
        raise ValueError("optimize: unet_graph replays the eager U-Net from CUDA graphs instead of compiling it; pass "
                         "compile=False with it (compile=True with mode='reduce-overhead' graphs the compiled one)")
    if attention is not None:
        model.unet.set_attention_backend(attention)
    attn = model.unet.attn_backend
    model.unet.fuse_projections(fuse_projections)  # False: an earlier call's fused copies are dropped
    model.unet.to(memory_format=torch.channels_last)
    model.vae.to(memory_format=torch.channels_last)
    uncompile(model)  # the last call wins: compiled below again (with this call's settings), graphed, or eager
    ungraph_unet(model.unet)
    if unet_graph:
        graph_unet(model.unet)
    if compile:
        if inductor_flags and backend == "inductor":
            set_inductor_flags()
        kw = compile_kwargs(backend, mode, options, fullgraph=fullgraph, dynamic=dynamic)
        unet_options = {**UNET_INDUCTOR_OPTIONS, **(options or {})} if inductor_flags and backend == "inductor" \
            else options
        unet_kw = compile_kwargs(backend, mode, unet_options, fullgraph=fullgraph, dynamic=dynamic)
        if backend == "inductor":
            guard_conv_templates(mode, options)  # torch builds whose autotuner can pick wrong convolutions
        unet, decoder = model.unet, model.vae.decoder
        compiled = [(unet, "forward", CompiledCall(unet.forward, unet_kw)),
                    (decoder, "forward", CompiledCall(decoder.forward, kw))]
        for obj, name, fn in compiled:
            setattr(obj, name, fn)
        if compile_text is True:
            encoder = getattr(model, "cond_stage_model", None)
            eager_text_encoder(encoder)  # compiled by an earlier call: compiled again with this call's settings
            compile_text_encoder(encoder, **kw)
        if scope == "denoiser":  # the U-Net is most of that graph
            compile_guided_denoiser(model, **unet_kw)
            guided = model.guided_denoiser()
            compiled.append((guided, "forward", vars(guided)["forward"]))
        vars(model)[COMPILED_ATTR] = compiled
    encoder = getattr(model, "cond_stage_model", None)
    if compile_text == "graph":
        graph_text_encoder(encoder)
    elif compile_text is False or not compile:
        eager_text_encoder(encoder)  # compiled or graphed by an earlier call: eager again
    log.info("fast path: attention %s, fused projections %s, compiled %s (mode=%s, scope=%s, U-Net graph %s, text "
             "encoder %s)", attn, fuse_projections, compile, mode if compile else "-", scope, unet_graph,
             {True: "compiled" if compile else "eager", False: "eager"}.get(compile_text, compile_text))
    return model


def uncompile(model: Any) -> int:
    """Take off what an earlier :func:`optimize` compiled on ``model`` (the U-Net's and the decoder's forward, the
    guided denoiser's with ``scope="denoiser"``): they run eager again. Returns how many were taken off; a wrapper
    replaced since by someone else is left alone."""
    removed = 0
    for obj, name, fn in vars(model).pop(COMPILED_ATTR, ()):
        if vars(obj).get(name) is fn:
            delattr(obj, name)
            removed += 1
    if removed:
        log.info("fast path: %d forward(s) compiled by an earlier optimize call run eager again", removed)
    return removed


def compile_kwargs(backend: str, mode: str | None, options: dict[str, Any] | None, **kw: Any) -> dict[str, Any]:
    """torch.compile's arguments. torch takes a mode or an options dict, not both: with ``options``, the mode's
    own inductor options (``torch._inductor.list_mode_options``) are merged under them. Other backends get
    neither."""
    if backend != "inductor":
        if options:
            raise ValueError(f"optimize: options are inductor settings; backend {backend!r} takes none")
        return dict(backend=backend, **kw)
    if not options:
        return dict(backend=backend, mode=mode, **kw)
    from torch._inductor import list_mode_options

    return dict(backend=backend, options={**list_mode_options(mode or "default", kw.get("dynamic")), **options}, **kw)


def _compile_method(obj: Any, name: str, context: Callable[[], Any] | None = None, **compile_kwargs: Any) -> None:
    """Replace ``obj.<name>`` by its ``torch.compile`` whose output is a copy (:class:`CompiledCall`): a CUDA graph's
    output is overwritten by its next replay, and callers keep results across calls. ``context``: a context-manager
    factory entered around each call. A method already compiled this way is left as it is."""
    if name in vars(obj):
        return  # already compiled
    setattr(obj, name, CompiledCall(getattr(obj, name), compile_kwargs, clone=True, context=context))


def _text_wrapper(encoder: Any) -> Any:
    """The wrapper an earlier call put on ``encoder.encode_ids`` (compiled or graphed), or None when it is the eager
    method; ``False`` for an encoder without ``encode_ids`` (logged: it stays eager)."""
    if not callable(getattr(encoder, "encode_ids", None)):
        log.info("fast path: %s has no encode_ids; its text encoder stays eager", type(encoder).__name__)
        return False
    return vars(encoder).get("encode_ids")


def compile_text_encoder(encoder: Any, **compile_kwargs: Any) -> bool:
    """Compile ``encoder.encode_ids`` (token ids on the device -> context) in place (a CUDA-graph wrapper from
    :func:`graph_text_encoder` is replaced); False for an encoder without one. Its output is a copy (the sampler holds
    both branches' contexts for a whole generate call)."""
    from ldm.cuda_graph import GraphedCall

    wrapper = _text_wrapper(encoder)
    if wrapper is False:
        return False
    if isinstance(wrapper, GraphedCall):
        del encoder.encode_ids  # replayed from CUDA graphs until now: compiled instead
    _compile_method(encoder, "encode_ids", **compile_kwargs)
    return True


def graph_text_encoder(encoder: Any) -> bool:
    """Replay ``encoder.encode_ids`` from a CUDA graph per token-batch shape (:class:`ldm.cuda_graph.GraphedCall`), in
    place (one compiled by :func:`compile_text_encoder` before is replaced); False for an encoder without one, or one
    already graphed."""
    from ldm.cuda_graph import GraphedCall

    wrapper = _text_wrapper(encoder)
    if wrapper is False or isinstance(wrapper, GraphedCall):
        return False
    if wrapper is not None:
        log.info("fast path: the compiled text encoder is replaced by CUDA-graph replay of the eager one")
        del encoder.encode_ids
    state = module_state(encoder) if isinstance(encoder, torch.nn.Module) else tuple
    encoder.encode_ids = GraphedCall(encoder.encode_ids, name=f"{type(encoder).__name__}.encode_ids", state=state,
                                     settings=functools.partial(text_settings, encoder),
                                     eager_hint="ldm.fast.optimize(..., compile_text=False)")
    return True


def text_settings(encoder: Any) -> tuple:
    """The Python values a text encoder's ``encode_ids`` reads that a recorded graph would keep: train/eval mode and
    the layer it conditions on (``ldm.addons.set_clip_skip``; a change records a new graph)."""
    return bool(getattr(encoder, "training", False)), getattr(encoder, "layer", None)


def module_state(module: torch.nn.Module) -> Callable[[], Iterable[torch.Tensor]]:
    """What a graph of ``module``'s computation reads besides its inputs: its parameters and buffers, as they are
    at each call (``GraphedCall``'s ``state``; a ``functools.partial``, which a copy of the module with its wrapper
    points at the copy, where a lambda would go on reading the original)."""
    return functools.partial(parameters_and_buffers, module)


def parameters_and_buffers(module: torch.nn.Module) -> Iterable[torch.Tensor]:
    """``module``'s parameters, then its buffers."""
    return itertools.chain(module.parameters(), module.buffers())


def eager_text_encoder(encoder: Any) -> bool:
    """Take off the wrapper :func:`compile_text_encoder` or :func:`graph_text_encoder` put on ``encode_ids`` (True
    if there was one): the encoder runs eager again."""
    if _text_wrapper(encoder):
        del encoder.encode_ids
        return True
    return False


def graph_unet(unet: torch.nn.Module) -> bool:
    """Replay ``unet``'s eager forward from a CUDA graph per call signature (:class:`ldm.cuda_graph.GraphedCall`), in
    place; False if it is compiled or graphed already. Sampling calls it under ``no_grad``; training calls (autograd
    on) and CPU calls run eager."""
    from ldm.cuda_graph import GraphedCall

    if "forward" in vars(unet):
        wrapper = vars(unet)["forward"]
        if not isinstance(wrapper, GraphedCall):
            log.info("fast path: the U-Net's forward is already wrapped (%s); not graphed", type(wrapper).__name__)
        return False
    unet.forward = GraphedCall(unet.forward, name=f"{type(unet).__name__}.forward", state=module_state(unet),
                               settings=functools.partial(unet_settings, unet),
                               eager_hint="ldm.fast.optimize(..., unet_graph=False)")
    return True


def unet_settings(unet: torch.nn.Module) -> tuple:
    """The Python values a U-Net's forward reads that a recorded graph would keep: train/eval mode, each attention's
    backend and fp32 upcast, each LoRA adapter's scale (a change records a new graph)."""
    from ldm.lora import LoRALinear
    from ldm.unet.attention import CrossAttention

    return unet.training, tuple((m.backend, m.upcast) if isinstance(m, CrossAttention) else m.scale
                                for m in unet.modules() if isinstance(m, (CrossAttention, LoRALinear)))


def ungraph_unet(unet: torch.nn.Module) -> bool:
    """Undo :func:`graph_unet` (True if there was a graph wrapper to remove)."""
    from ldm.cuda_graph import GraphedCall

    if isinstance(vars(unet).get("forward"), GraphedCall):
        del unet.forward
        return True
    return False


def compile_guided_denoiser(model: Any, **compile_kwargs: Any) -> None:
    """Compile ``model.guided_denoiser()``'s forward in place (see :func:`optimize`, ``scope="denoiser"``).

    The σ → t table is put on the model's device first, so the graph holds no CPU tensor (which would turn CUDA
    graphs off). The guidance weight and rescale are traced as constants (``specialize_float``): another value
    compiles another graph rather than reaching a CUDA graph recorded with the old one. The returned x̂0 is a copy
    (multistep samplers keep the previous x̂0).
    """
    guided = model.guided_denoiser()
    dev = model.device
    table_dtype = torch.float32 if dev.type == "mps" else torch.float64
    guided.inner_model.sigma_to_t(torch.ones(1, device=dev, dtype=table_dtype))
    _compile_method(guided, "forward", specialized_floats, **compile_kwargs)


def specialized_floats() -> contextlib.AbstractContextManager:
    """Dynamo traces Python floats as constants inside this context (the guided denoiser's guidance weight)."""
    return torch._dynamo.config.patch(specialize_float=True)
