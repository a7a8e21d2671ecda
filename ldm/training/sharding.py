"""``trainer.strategy: fsdp``: the U-Net's weights, gradients and AdamW moments sharded across the ranks (PyTorch's
FSDP2, ``torch.distributed.fsdp.fully_shard``, through Lightning's ``ModelParallelStrategy``).

Each rank holds 1/N of every U-Net parameter as a ``DTensor`` shard. A block's whole weights are gathered for its
forward and backward and freed after; its gradients are reduce-scattered, averaged over the ranks as under DDP. The
frozen autoencoder and text encoder stay whole on every rank (they have no gradients or optimizer state).

What reads whole weights works on the shards instead:

- the EMA keeps sharded copies (``DTensor`` buffers beside the shards they average), updated shard by shard;
- the gradient norm (non-finite check, ``train.grad_clip``) sums the shards' squares over all ranks;
- the sample grids, exports and snapshots run on every rank, whose block forwards all-gather together; rank 0
  writes the files, gathered with :func:`full_state_dict`;
- checkpoints hold the whole weights and optimizer state, gathered on rank 0 into one file, so ``--resume`` and
  ``train.init_checkpoint`` read them as any other; a run may resume with another strategy or world size.

Only the diffusion stage shards; the refusals in :func:`check_sharded_config` name what does not combine.
"""
from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import torch
from omegaconf import DictConfig

from ldm.registry import ConfigError

log = logging.getLogger(__name__)

FSDP = "fsdp"


def sharded_strategy(timeout_s: float) -> Any:
    """The strategy for ``trainer.strategy: fsdp``: one data-parallel mesh over all ranks, collectives bounded by
    ``timeout_s`` (``train.dist_timeout_s``), checkpoints gathered into one file (rank 0)."""
    from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: PLC0415

    class FullyShardedStrategy(ModelParallelStrategy):
        """``ModelParallelStrategy`` with every rank in one data-parallel dimension (no tensor parallelism)."""

        strategy_name = FSDP

        def setup_environment(self) -> None:
            self._data_parallel_size, self._tensor_parallel_size = self.num_nodes * self.num_processes, 1
            super().setup_environment()

        def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
            """Tensors and plain containers only (``weights_only=True``), as every other load of ldm."""
            return super().load_checkpoint(checkpoint_path, weights_only=True)

    return FullyShardedStrategy(save_distributed_checkpoint=False, timeout=timedelta(seconds=timeout_s))


def is_sharding(module: Any) -> bool:
    """Whether ``module`` (a LightningModule) trains under ``trainer.strategy: fsdp``."""
    trainer = getattr(module, "_trainer", None)
    return trainer is not None and getattr(trainer.strategy, "strategy_name", None) == FSDP


def check_sharded_config(cfg: DictConfig) -> None:
    """What ``trainer.strategy: fsdp`` does not combine with, named (the diffusion stage's full U-Net training)."""
    t, tc = cfg.train, cfg.get("trainer") or {}
    refuse = {
        "train.stage": t.get("stage", "diffusion") != "diffusion",
        "train.lora": int((t.get("lora") or {}).get("rank", 0) or 0) > 0,
        "train.textual_inversion": bool(t.get("textual_inversion")),
        "model.params.cond_stage_trainable": bool(cfg.model.params.get("cond_stage_trainable", False)),
        "train.channels_last": t.get("channels_last") is True,
        "train.compile_mode": t.get("compile_mode") in ("reduce-overhead", "max-autotune"),
        "trainer.precision (16-mixed)": str(tc.get("precision", "32")).startswith("16"),
    }
    why = {
        "train.stage": "only the diffusion stage shards (the autoencoder and CLIP stages train with ddp)",
        "train.lora": "LoRA adapters are small enough for every rank: use ddp",
        "train.textual_inversion": "the new word's vectors are small enough for every rank: use ddp",
        "model.params.cond_stage_trainable": "the text encoder is not sharded, so its gradients would not be "
                                            "averaged over the ranks: use ddp",
        "train.compile_mode": "CUDA-graph replay around the shards' all-gathers is not supported: leave it null "
                              "(compiled without graphs)",
        "train.channels_last": "FSDP2 shards contiguous weights only: leave it null (off under fsdp)",
        "trainer.precision (16-mixed)": "fp16's grad scaler would need the shards' inf checks: use bf16-mixed",
    }
    for key, bad in refuse.items():
        if bad:
            raise ConfigError(f"trainer.strategy=fsdp does not combine with {key}: {why[key]}")


def shard_unet(module: Any, mesh: Any) -> None:
    """``fully_shard`` each block of the U-Net (its own all-gather and reduce-scatter), then the rest of
    ``net.model`` (time embedding, input and output convolutions) as the root."""
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

    unet = module.net.unet
    blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    # the root too frees its whole weights after each forward (FSDP2 keeps a root's by default until the backward):
    # outside a forward only the shards are registered, so that the optimizer, the gradient norm, the EMA and its
    # swap into the model for validation and sampling all see the same shards, and a forward without a backward
    # (validation) leaves no whole weights behind for the next step to reuse
    fully_shard(module.net.model, mesh=mesh, reshard_after_forward=True)
    n = sum(p.numel() for p in module.net.model.parameters())
    log.info("trainer.strategy=fsdp: U-Net sharded in %d blocks over %d ranks (%.1fM parameters, %.1fM per rank)",
             len(blocks), mesh.size(), n / 1e6, n / mesh.size() / 1e6)


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank's shard of a ``DTensor`` (a plain tensor as it is)."""
    return t.to_local() if hasattr(t, "to_local") else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a ``DTensor`` (a collective: every rank calls it, in the same order)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_state_dict(module: torch.nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with every ``DTensor`` gathered whole, on the host. A collective: every rank calls it,
    and only the ranks with ``keep`` (rank 0, which writes) hold the result; the others gather one tensor at a time
    and drop it."""
    out = {}
    for k, v in module.state_dict().items():
        v = full(v).detach()
        if keep:
            out[k] = v.cpu()
    return out


def sharded_norm(grads: list[torch.Tensor]) -> torch.Tensor | None:
    """‖g‖₂ over every rank's shards of ``grads`` when they are ``DTensor`` shards (a plain tensor, all-reduced: the
    same on every rank), else None."""
    if not grads or not hasattr(grads[0], "to_local"):
        return None
    shards = [g.to_local() for g in grads]
    sq = torch.stack(torch._foreach_norm(shards, 2.0)).float().square().sum()  # () this rank's Σ g²
    torch.distributed.all_reduce(sq, group=grads[0].device_mesh.get_group())
    return sq.sqrt()
