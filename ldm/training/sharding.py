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

Under gradient accumulation (``trainer.accumulate_grad_batches: k``) every batch's gradients are reduce-scattered
into the shards, where the window's k batches add up: the gradients stay at 1/N of their size throughout, which is
what sharding is for. DDP instead skips the all-reduce before the window's last batch (``no_sync``); FSDP2's
equivalent (``set_requires_gradient_sync(False)``) would keep whole, unsharded gradients on every rank between
batches, as much memory as DDP's, so it is not used: k reduce-scatters per step move as much data as k/2 all-reduces.

Only the diffusion stage shards; the refusals in :func:`check_sharded_config` name what does not combine.
"""
from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from omegaconf import DictConfig

from ldm.registry import ConfigError
from ldm.shards import gathered, is_sharded, local_shard

log = logging.getLogger(__name__)

FSDP = "fsdp"


class FullyShardedStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` with every rank in one data-parallel dimension (no tensor parallelism),
    and checkpoints of whole tensors in DDP's layout, read and written through the module's own ``state_dict`` (its
    key hooks: SD v1's text encoder saves under HF names that are not attribute paths, which
    ``torch.distributed.checkpoint.state_dict`` walks) and the optimizer's."""

    strategy_name = FSDP

    def setup_environment(self) -> None:
        self._data_parallel_size, self._tensor_parallel_size = self.num_nodes * self.num_processes, 1
        super().setup_environment()

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return full_state_dict(self.lightning_module, keep=self.is_global_zero)

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """The optimizer's state dict (parameters by index), each shard of its moments gathered whole."""
        sd = getattr(optimizer, "_optimizer", optimizer).state_dict()
        keep = self.is_global_zero
        state = {i: whole_tensors(s, keep) for i, s in sorted(sd["state"].items())}
        return {"state": state, "param_groups": sd["param_groups"]} if keep else {}

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """A whole-tensor checkpoint file (this strategy's or DDP's): weights and optimizer state cut to this rank's
        shards; the rest returned for Lightning's loops and the module's ``on_load_checkpoint``. Tensors and plain
        containers only (``weights_only=True``), as every other load of ldm."""
        path = Path(self.broadcast(str(checkpoint_path)))
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {str(path)!r} not found (a file of whole tensors)")
        ckpt = torch.load(path, mmap=True, map_location="cpu", weights_only=True)
        module = self.lightning_module
        load_whole_state(module, ckpt.pop("state_dict"), strict=module.strict_loading)
        for opt, saved in zip(self.optimizers, ckpt.get("optimizer_states", [])):
            load_whole_optimizer_state(opt, saved)
        return ckpt


class ShardLocalAdamW(torch.optim.AdamW):
    """AdamW whose update runs on the local tensors of ``DTensor`` parameters, gradients and moments (each rank's
    own shards; the state keeps the ``DTensor`` objects, so its state dict and checkpoints are as before).

    The arithmetic is AdamW's, element by element on the shards, without ``DTensor``'s dispatch of the multi-tensor
    kernel: for the tiny U-Net's 286 tensors on the CPU that dispatch took 2 s at the first step (the sharding
    propagation of every tensor of every list) and 13 ms of host time at each later one; on the shards, 1.3 ms."""

    def _init_group(self, group: dict[str, Any], params: list, grads: list, exp_avgs: list, exp_avg_sqs: list,
                    max_exp_avg_sqs: list, state_steps: list) -> bool:
        has_complex = super()._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
        for tensors in (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps):
            tensors[:] = [local_shard(x) for x in tensors]
        return has_complex


def sharded_strategy(timeout_s: float) -> FullyShardedStrategy:
    """The strategy for ``trainer.strategy: fsdp``: collectives bounded by ``timeout_s`` (``train.dist_timeout_s``),
    checkpoints gathered into one file (rank 0)."""
    return FullyShardedStrategy(save_distributed_checkpoint=False, timeout=timedelta(seconds=timeout_s))


def like(whole: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``whole`` (a whole tensor, on the host) cut as ``ref`` is, when ``ref`` is a ``DTensor`` shard of the same
    shape: this rank's piece, from its own copy (no communication); else ``whole`` as it is."""
    if not is_sharded(ref) or tuple(whole.shape) != tuple(ref.shape):
        return whole
    from torch.distributed.tensor import distribute_tensor  # noqa: PLC0415

    return distribute_tensor(whole.to(ref.device, ref.dtype), ref.device_mesh, ref.placements, src_data_rank=None)


def load_whole_state(module: torch.nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load a state dict of whole tensors into ``module``, whose ``DTensor`` entries (the sharded U-Net, its EMA)
    take this rank's shard of theirs; through ``module.load_state_dict``, so its key hooks apply."""
    own = module.state_dict()
    module.load_state_dict({k: like(v, own[k]) if k in own else v for k, v in state.items()}, strict=strict)


def load_whole_optimizer_state(optimizer: Any, saved: dict[str, Any]) -> None:
    """An optimizer state dict of whole tensors (parameters by index) into ``optimizer``, whose parameters are
    ``DTensor`` shards: each moment cut as its parameter is."""
    optimizer = getattr(optimizer, "_optimizer", optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if len(saved["state"]) > len(params):
        raise ValueError(f"the checkpoint's optimizer has state for {len(saved['state'])} parameters, this run trains "
                         f"{len(params)}")
    state = {i: {k: like(v, params[i]) if torch.is_tensor(v) else v for k, v in s.items()}
             for i, s in saved["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


def is_sharding(module: Any) -> bool:
    """Whether ``module`` (a LightningModule) trains under ``trainer.strategy: fsdp``."""
    trainer = getattr(module, "_trainer", None)
    return trainer is not None and getattr(trainer.strategy, "strategy_name", None) == FSDP


def check_sharded_config(cfg: DictConfig) -> None:
    """What ``trainer.strategy: fsdp`` does not combine with, named (the diffusion stage's full U-Net training)."""
    t, tc = cfg.train, cfg.get("trainer") or {}
    rules = {  # key: (whether the config sets it, why it is refused)
        "train.stage": (t.get("stage", "diffusion") != "diffusion",
                        "only the diffusion stage shards (the autoencoder and CLIP stages train with ddp)"),
        "train.lora": (int((t.get("lora") or {}).get("rank", 0) or 0) > 0,
                       "LoRA adapters are small enough for every rank: use ddp"),
        "train.textual_inversion": (bool(t.get("textual_inversion")),
                                    "the new word's vectors are small enough for every rank: use ddp"),
        "model.params.cond_stage_trainable": (bool(cfg.model.params.get("cond_stage_trainable", False)),
                                              "the text encoder is not sharded, so its gradients would not be "
                                              "averaged over the ranks: use ddp"),
        "train.channels_last": (t.get("channels_last") is True,
                                "FSDP2 shards contiguous weights only: leave it null (off under fsdp)"),
        "train.compile_mode": (t.get("compile_mode") in ("reduce-overhead", "max-autotune"),
                               "CUDA-graph replay around the shards' all-gathers is not supported: leave it null "
                               "(compiled without graphs)"),
        "trainer.precision (16-mixed)": (str(tc.get("precision", "32")).startswith("16"),
                                         "fp16's grad scaler would need the shards' inf checks: use bf16-mixed"),
    }
    for key, (bad, why) in rules.items():
        if bad:
            raise ConfigError(f"trainer.strategy=fsdp does not combine with {key}: {why}")


def joins(trainer: Any, module: Any) -> bool:
    """Whether this rank runs what rank 0 alone writes (exports, snapshots, sample grids): rank 0, and under
    ``trainer.strategy: fsdp`` every rank, whose sharded blocks gather their weights together."""
    return bool(trainer.is_global_zero) or is_sharding(module)


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


def whole_tensors(state: Any, keep: bool = True) -> dict[str, Any]:
    """``state`` (name -> tensor or value) with every ``DTensor`` gathered whole, on the host. A collective: every
    rank calls it, and only the ranks with ``keep`` (rank 0, which writes) hold the result; the others gather one
    tensor at a time and drop it."""
    out = {}
    for k, v in state.items():
        v = gathered(v.detach()) if torch.is_tensor(v) else v
        if keep:
            out[k] = v.cpu() if torch.is_tensor(v) else v
    return out


def full_state_dict(module: torch.nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` gathered whole (:func:`whole_tensors`)."""
    return whole_tensors(module.state_dict(), keep)


def sharded_norm(grads: list[torch.Tensor]) -> torch.Tensor | None:
    """‖g‖₂ over every rank's shards of ``grads`` when they are ``DTensor`` shards (a plain tensor, all-reduced: the
    same on every rank), else None."""
    if not grads or not is_sharded(grads[0]):
        return None
    shards = [local_shard(g) for g in grads]
    sq = torch.stack(torch._foreach_norm(shards, 2.0)).float().square().sum()  # () this rank's Σ g²
    torch.distributed.all_reduce(sq, group=grads[0].device_mesh.get_group())
    return sq.sqrt()
