"""``train.channels_last``: the U-Net's weights (and its EMA copy) in NHWC for training.

Measured on one H200 (docs/BENCHMARKS.md, 2026-11-29): with ``train.compile`` the SD-1.5 U-Net step at 256 px and
batch 128 runs at 614 img/s in channels_last (the compiled NCHW step at that batch was not measured, so the layout's
own share of that is open); in eager mode channels_last is *slower* (217 vs 279 img/s at batch 32: the eager
GroupNorm kernels convert layouts). So the default (null) turns it on exactly when the U-Net is compiled and
training runs on a CUDA device, the measured fast configuration; true/false force it.

Fused AdamW reads parameters, gradients and moments as flat buffers: moments whose strides differ from their
parameter's (a checkpoint saved in the other layout) would be updated element by element against the wrong
entries, silently. :func:`match_optimizer_state` puts every state tensor in its parameter's layout after a resume.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def wants_channels_last(t: DictConfig, device: torch.device) -> bool:
    """``train.channels_last``: true/false, or null: on when ``train.compile`` is set and ``device`` is CUDA."""
    choice = t.get("channels_last")
    if choice is None:
        return bool(t.get("compile", False)) and torch.device(device).type == "cuda"
    if not isinstance(choice, bool):
        raise ValueError(f"train.channels_last must be true, false or null, got {choice!r}")
    return choice


def to_channels_last(*modules: torch.nn.Module | None) -> None:
    """4-D parameters and buffers of each module in channels_last (in place: the Parameter objects stay)."""
    for m in modules:
        if m is not None:
            m.to(memory_format=torch.channels_last)


def match_optimizer_state(optimizer: torch.optim.Optimizer) -> int:
    """Give each per-parameter state tensor shaped like its parameter the parameter's strides; returns how many
    tensors were re-laid out (0 when the layouts already agree)."""
    moved = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            state: dict[str, Any] = optimizer.state.get(p, {})
            for k, v in state.items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    state[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)
                    moved += 1
    if moved:
        log.info("optimizer state: %d tensors re-laid out to match their parameters' memory format", moved)
    return moved
