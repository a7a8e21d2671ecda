"""CPU stand-ins for torch.cuda's graph, stream and device calls, so that the plumbing of
:class:`ldm.cuda_graph.GraphedCall` (static inputs, records, replays, copies) can be checked without a GPU."""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch


class _Stream:
    def wait_stream(self, other: Any) -> None:
        pass


def stand_in_cuda(monkeypatch: Any, graph_cls: type, last_call: Callable[[], Any]) -> None:
    """``torch.cuda.CUDAGraph`` becomes ``graph_cls``; a capture block (``torch.cuda.graph``) stores ``last_call()``,
    the call made inside it, in the graph's ``recorded`` for its ``replay``; streams and devices do nothing."""
    @contextlib.contextmanager
    def capture(graph: Any) -> Any:
        yield
        graph.recorded = last_call()

    monkeypatch.setattr(torch.cuda, "CUDAGraph", graph_cls)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
