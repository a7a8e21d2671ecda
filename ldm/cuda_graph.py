"""CUDA-graph replay of an eager function, without a compiler.

:class:`GraphedCall` records ``fn(*args, **kwargs)`` once per call signature (:func:`call_signature`: the tensors'
shapes, dtypes and devices, the other arguments' values) in a CUDA graph and replays it afterwards: the launches of a
network (the text encoder's ~150 kernels per prompt batch, the U-Net's ~1,000 per step) cost one graph launch
instead of one Python dispatch each, with no compile time. ``ldm.fast.optimize`` uses it for the text encoder
(``compile_text="graph"``, the default) and, without a compiler, for the U-Net (``compile=False, unet_graph=True``).

What a captured function may not do is what CUDA graphs forbid: read a device value on the host (``.item()``,
data-dependent shapes), or allocate pinned host memory. ``fn`` must be a pure function of its tensor inputs and of
the tensors ``state()`` returns (a module's parameters and buffers): the graph holds their addresses, so their
values may change in place (an optimizer step), and when one is replaced or moved (``.half()``, ``.to()``,
``load_state_dict(assign=True)``) the graphs are recorded again.

A copy of a wrapped module (``copy.deepcopy``, for an EMA or evaluation copy; pickle) gets a :class:`GraphedCall` of
its own, without graphs: they are recorded again, for the copy's parameters, at its first calls on the GPU. (A
recorded graph holds the addresses of the original's parameters and static buffers: replayed for the copy, it would
compute with the original's weights and write into the original's buffers.)
"""
from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Callable, Hashable, Iterable, Iterator

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

log = logging.getLogger(__name__)

WARMUP_CALLS = 2  # eager calls on a side stream before capture: cuBLAS workspaces, cuDNN plans, lazy inits


def signature(x: torch.Tensor) -> tuple:
    """What a recorded graph depends on besides the values: the input's shape, dtype and device, inference mode, and
    autocast on the input's device (a graph recorded without it would replay fp32 kernels under it)."""
    kind = x.device.type
    autocast = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
    return tuple(x.shape), x.dtype, x.device, torch.is_inference_mode_enabled(), autocast


def call_signature(args: tuple, kwargs: dict) -> tuple | None:
    """What a graph recorded for ``fn(*args, **kwargs)`` depends on: the arguments' structure, each tensor's
    :func:`signature`, every other argument's value (``repeat=2``, ``y=None``); None when such a value is not
    hashable (the call then runs eager)."""
    return leaves_signature(*tree_flatten((args, kwargs)))


def leaves_signature(leaves: list, spec: Any) -> tuple | None:
    """:func:`call_signature` of a call already flattened by ``tree_flatten``."""
    parts = tuple(signature(leaf) if isinstance(leaf, torch.Tensor) else ("value", type(leaf), leaf) for leaf in leaves)
    try:
        hash(parts)
    except TypeError:
        return None
    return str(spec), parts


def without_autocast_cache(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast as it is, without its cache of cast weights: a graph recorded with a cached cast would read memory
    that autocast frees when its context ends (so the casts are recorded in the graph instead)."""
    if not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type), cache_enabled=False)


def clear_cublas_workspaces() -> None:
    """Drop cuBLAS's cached workspaces (one per handle and stream, kept by torch for the life of the process)."""
    torch._C._cuda_clearCublasWorkspaces()


@contextlib.contextmanager
def cublas_workspaces_cleared() -> Iterator[None]:
    """cuBLAS's cached workspaces dropped before a capture and after it, as inductor's CUDA-graph trees do around
    theirs (``torch._inductor.cudagraph_trees.clear_cublas_manager``). A matmul recorded in a graph allocates its
    workspace for the capture stream inside the graph's private memory pool; kept in torch's cache, that workspace
    would outlive the graph (and be handed to every later matmul on that stream, in other graphs too) while its
    memory belongs to the graph's pool. Dropped at the end of the capture, the memory stays the graph's alone.
    Measured on an H100 (docs/BENCHMARKS.md, eighteenth session): without it, a model compiled with
    ``reduce-overhead`` crashed ("CUDA error: unspecified launch failure") on its second run after another compiled
    model, in a process where models replayed from these graphs had run and been freed (both probe scenarios);
    with it, that run gives its first latents exactly."""
    clear_cublas_workspaces()
    try:
        yield
    finally:
        clear_cublas_workspaces()


MANY_GRAPHS = 32  # a GraphedCall that has recorded this many graphs says so (each holds its own memory)


class GraphedCall:
    """``fn(*args, **kwargs) -> Tensor`` replayed from a CUDA graph per call signature; eager where a graph cannot
    serve.

    Eager (``fn`` called as it is): a call without tensors, with a tensor not on a CUDA device, with an argument whose
    value cannot key a graph (not hashable), or with autograd recording (graphs hold no autograd history: training
    calls stay eager). The tensors are copied into the graph's static inputs before each replay; the other arguments
    are part of the signature, so a new value records a new graph. The result of a replay is a copy (the graph's
    output buffer is overwritten by the next replay, and callers keep results across calls). Threads take turns (a
    lock around the copies in, the replay and the copy out); they are expected to share one CUDA stream, as they do
    by default.
    """

    device_type = "cuda"  # where calls are recorded (tests of the plumbing set another, with stand-ins for the graphs)

    def __init__(self, fn: Callable[..., torch.Tensor], name: str = "function",
                 state: Callable[[], Iterable[torch.Tensor]] = tuple, settings: Callable[[], Hashable] = tuple,
                 eager_hint: str = "call fn itself") -> None:
        """``state``: the tensors ``fn`` reads besides its arguments; ``settings``: the Python values it reads that
        may change between calls (an attention backend, an adapter's scale), part of the signature; ``eager_hint``:
        how to run it without graphs, for the message of a failed capture."""
        self.fn, self.name, self.state, self.settings, self.eager_hint = fn, name, state, settings, eager_hint
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]] = {}
        self.addresses: tuple[tuple[int, torch.dtype], ...] = ()
        self.lock = threading.Lock()  # one caller at a time between the copies into the static inputs and the clone

    def __getstate__(self) -> dict[str, Any]:
        """What a copy keeps (``copy.deepcopy``, pickle): the function, its ``state`` and ``settings`` (copied with
        the module they belong to: a bound method and ``functools.partial`` over the module follow the copy), not the
        recorded graphs, their static buffers or the lock. The copy records its own graphs at its first calls."""
        state = dict(vars(self))
        del state["lock"]
        state["graphs"], state["addresses"] = {}, ()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        vars(self).update(state)
        self.lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        leaves, spec = tree_flatten((args, kwargs))
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        if not tensors or any(t.device.type != self.device_type for t in tensors) or torch.is_grad_enabled():
            return self.fn(*args, **kwargs)
        key = self._key(leaves, spec)
        if key is None:
            return self.fn(*args, **kwargs)
        device = tensors[0].device
        with self.lock, torch.cuda.device(device):  # capture and replay on the input's device, whichever is current
            self.drop_stale_graphs()
            if key not in self.graphs:
                self.graphs[key] = self._capture(leaves, spec, device)
                self._warn_if_many()
            graph, static_inputs, static_y = self.graphs[key]
            for static, t in zip(static_inputs, tensors):
                static.copy_(t)
            graph.replay()
            return static_y.clone()

    def _warn_if_many(self) -> None:
        if len(self.graphs) == MANY_GRAPHS:
            log.warning("%s: %d CUDA graphs recorded, one per call signature (shapes, dtypes, and the values of "
                        "non-tensor arguments), each keeping its own memory: an argument that changes every call, "
                        "such as a Python float timestep, records a graph per value (pass a tensor)", self.name,
                        MANY_GRAPHS)

    def key(self, args: tuple, kwargs: dict) -> tuple | None:
        """The graph a call replays: its :func:`call_signature` and the current ``settings()``; None: run eager."""
        return self._key(*tree_flatten((args, kwargs)))

    def _key(self, leaves: list, spec: Any) -> tuple | None:
        sig = leaves_signature(leaves, spec)
        return None if sig is None else (sig, self.settings())

    def drop_stale_graphs(self) -> None:
        """Forget the recorded graphs when a tensor of ``state()`` was replaced or moved (their addresses in the
        graphs would be stale), or converted to another dtype (a new tensor can land at the old address)."""
        addresses = tuple((t.data_ptr(), t.dtype) for t in self.state())
        if addresses != self.addresses:
            if self.graphs:
                log.info("%s: parameters moved or replaced; recording its CUDA graphs again", self.name)
            self.graphs, self.addresses = {}, addresses

    def _capture(self, leaves: list, spec: Any,
                 device: torch.device) -> tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]:
        with without_autocast_cache(device.type), cublas_workspaces_cleared():
            return self._record(leaves, spec, device)

    def _record(self, leaves: list, spec: Any,
                device: torch.device) -> tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]:
        """Warm ``fn`` up on a side stream, then record it reading static copies of the call's tensors (``leaves``
        and ``spec``: the call as ``tree_flatten`` gives it)."""
        leaves = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        static_args, static_kwargs = tree_unflatten(leaves, spec)
        shapes = [tuple(leaf.shape) for leaf in leaves if isinstance(leaf, torch.Tensor)]
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                self.fn(*static_args, **static_kwargs)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                static_y = self.fn(*static_args, **static_kwargs)
        except RuntimeError as e:  # an operation CUDA graphs forbid (a host read of a device value, a sync)
            raise RuntimeError(f"GraphedCall({self.name}): recording a CUDA graph for inputs {shapes} failed; "
                               f"run it eager instead ({self.eager_hint}): {e}") from e
        if not isinstance(static_y, torch.Tensor):
            raise TypeError(f"GraphedCall({self.name}): expected a tensor output, got {type(static_y).__name__}")
        log.info("CUDA graph of %s recorded for inputs %s (%d graphs)", self.name, shapes, len(self.graphs) + 1)
        return graph, [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)], static_y
