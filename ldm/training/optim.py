"""Optimizer, learning-rate schedule and per-step random generators shared by the stage modules."""
from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig

from ldm.lr_schedule import linear_warmup
from ldm.shards import is_sharded
from ldm.training.sharding import ShardLocalAdamW
from ldm.training.step_log import batches_per_step

log = logging.getLogger(__name__)


def effective_lr(module: Any, t: DictConfig) -> float:
    """``train.lr`` scaled by the explicit rule ``train.lr_scale``:

    - ``none`` (default): the learning rate is used as given;
    - ``linear``: lr × (batch_size × devices × num_nodes × accumulate_grad_batches) / ``train.lr_base_batch``
      — the number of nodes counts too (the original LDM main.py forgot it).
    """
    lr = float(t.lr)
    rule = t.get("lr_scale", "none")
    if rule == "none":
        return lr
    if rule != "linear":
        raise ValueError(f"train.lr_scale must be 'none' or 'linear', got {rule!r}")
    tr = module.trainer
    cfg = module.config
    total = int(cfg.data.batch_size) * tr.num_devices * tr.num_nodes * accumulate_batches(cfg)
    scaled = lr * total / float(t.get("lr_base_batch", 1))
    log.info("lr %.3g = %.3g × global batch %d / %s (train.lr_scale=linear)", scaled, lr, total,
             t.get("lr_base_batch", 1))
    return scaled


def accumulate_batches(cfg: DictConfig) -> int:
    """``trainer.accumulate_grad_batches`` (default 1): batches whose gradients add up to one optimizer step.
    Applied by :func:`ldm.training.guard.guarded_step`, not by Lightning (the stages optimize manually)."""
    k = (cfg.get("trainer") or {}).get("accumulate_grad_batches", 1)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"trainer.accumulate_grad_batches must be a positive int, got {k!r}")
    return k


def use_fused(module: Any, params: list[torch.nn.Parameter], t: DictConfig | None = None) -> bool:
    """Fused Adam(W) on CUDA, except under fp16 AMP (its grad scaler must unscale before clipping, which a fused
    optimizer does internally, so Lightning refuses to clip). ``train.fused_optimizer: true/false`` forces it
    (true also on the CPU, where torch has a fused kernel too); null (default) decides as above."""
    trainer = getattr(module, "_trainer", None)
    precision = str(getattr(trainer, "precision", "")) if trainer is not None else ""
    if not params or precision.startswith("16"):
        return False
    forced = t.get("fused_optimizer") if t is not None else None
    if forced is not None:
        if not isinstance(forced, bool):
            raise ValueError(f"train.fused_optimizer must be true, false or null, got {forced!r}")
        return forced
    return all(p.is_cuda for p in params)


def build_optimizer(module: Any, params: list[torch.nn.Parameter] | list[dict[str, Any]], t: DictConfig) -> Any:
    """AdamW (fused on CUDA) with linear warm-up then constant (SD's recipe). ``params``: parameters, or parameter
    groups (``{"params": [...], "lr_ratio": r}``: the group's learning rate is r × the effective ``train.lr``)."""
    flat = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    if not flat:
        raise ValueError("nothing to train: no parameter requires grad")
    fused = use_fused(module, flat, t)
    lr = effective_lr(module, t)
    if params and isinstance(params[0], dict):
        params = [{k: v for k, v in g.items() if k != "lr_ratio"} | {"lr": lr * float(g.get("lr_ratio", 1.0))}
                  for g in params]
    adamw = ShardLocalAdamW if any(is_sharded(p) for p in flat) else torch.optim.AdamW  # fsdp's shards
    opt = adamw(params, lr=lr, betas=tuple(t.get("betas", (0.9, 0.999))),
                weight_decay=float(t.get("weight_decay", 0.01)), eps=float(t.get("eps", 1e-8)), fused=fused or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup(int(t.get("warmup_steps", 0))))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def step_generator(module: Any, seed: int) -> torch.Generator:
    """A generator on the module's device seeded by (seed, global step, rank, batch within the accumulation
    window): noise and timesteps differ per rank, step and accumulated batch, and a resumed run draws exactly what
    the uninterrupted run would have. Without accumulation the batch term is 0."""
    rank = module.global_rank if module.trainer is not None else 0
    step = module.global_step
    k = batches_per_step(module)
    micro = (int(getattr(module, "batches_seen", 1)) - 1) % k  # 0 … k−1 (batches_seen counts the current batch)
    g = torch.Generator(device=module.device)
    g.manual_seed((seed * 1_000_003 + step * 7919 + rank * 104_729 + micro * 15_485_863) % (2**63 - 1))
    return g
