"""Run ``ldm-train`` with a probe that records, per rank, what the multi-GPU tests check (not a test module itself).

    python tests/multigpu_probe.py OUT_DIR --config configs/tiny/txt2img.yaml trainer.devices=2 ...

Lightning's DDP launcher re-runs this script for every rank, so every rank carries the probe. Each rank writes
``OUT_DIR/rank<R>.json``: the rank and world size Lightning gave it, the sample keys of each training batch, a
digest of the trained weights and of the EMA, the bytes DDP broadcast per step, the paths it saved checkpoints to and
the sample grids it drew. Environment switches:

- ``PROBE_KEYED_NOISE=1``: each sample's timestep and noise (and the posterior mode as its latent) depend on its key
  and the step alone, not on the rank or its place in the batch, so runs that split the same samples differently
  across ranks train the same weights;
- ``PROBE_MERGE_RANKS=N``: a single process reads, at every step, the batches ranks 0..N-1 of an N-rank run would
  read, concatenated (the data of an N-rank run as one batch);
- ``PROBE_SIGUSR1_AT_STEP=S``: the process sends itself SIGUSR1 during the backward of step S (a SLURM pre-emption
  warning arriving mid-step).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import zlib
from pathlib import Path
from typing import Any

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Probe(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out
        self.keys: list[list[str]] = []
        self.broadcast: list[int] = []
        self.saved: list[str] = []
        self.grids: list[int] = []
        self.losses: list[float] = []

    def on_train_start(self, trainer: L.Trainer, module: Any) -> None:
        ddp = trainer.strategy.model
        original = getattr(ddp, "_distributed_broadcast_coalesced", None)
        if original is not None:
            def counting(tensors: list[torch.Tensor], *args: Any, **kwargs: Any) -> Any:
                if self.broadcast:
                    self.broadcast[-1] += sum(t.numel() * t.element_size() for t in tensors)
                return original(tensors, *args, **kwargs)
            ddp._distributed_broadcast_coalesced = counting
        io = trainer.strategy.checkpoint_io
        save = io.save_checkpoint

        def recording(checkpoint: dict, path: Any, *args: Any, **kwargs: Any) -> Any:
            self.saved.append(str(path))
            return save(checkpoint, path, *args, **kwargs)
        io.save_checkpoint = recording
        for cb in trainer.callbacks:
            if type(cb).__name__ == "SampleGrid":
                draw = cb.sample

                def drawing(tr: Any, mod: Any, step: int, draw: Any = draw, **kw: Any) -> Any:
                    if kw.get("write", True):  # the rank that writes the grid
                        self.grids.append(step)
                    return draw(tr, mod, step, **kw)
                cb.sample = drawing

    def on_train_batch_start(self, trainer: L.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
        self.keys.append(list(batch["key"]))
        self.broadcast.append(0)

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))

    def on_before_backward(self, trainer: L.Trainer, module: Any, loss: torch.Tensor) -> None:
        at = os.environ.get("PROBE_SIGUSR1_AT_STEP")
        if at is not None and trainer.global_step == int(at) and not getattr(self, "_signalled", False):
            self._signalled = True
            os.kill(os.getpid(), signal.SIGUSR1)

    def on_train_end(self, trainer: L.Trainer, module: Any) -> None:
        trained = {k: v for k, v in module.net.model.named_parameters()}
        ema = module.model_ema.state_dict() if module.model_ema is not None else {}
        rec = {"rank": trainer.global_rank, "world_size": trainer.world_size, "local_rank": trainer.local_rank,
               "node_rank": trainer.node_rank, "is_global_zero": trainer.is_global_zero,
               "keys": self.keys, "losses": self.losses, "broadcast_bytes": self.broadcast, "saved": self.saved,
               "grids": self.grids,
               "weights": digest(trained), "ema": digest(ema), "global_step": trainer.global_step,
               "ema_bytes": sum(v.numel() * v.element_size() for v in ema.values())}
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(rec))
        torch.save({k: v.detach().cpu() for k, v in trained.items()}, self.out / f"weights{trainer.global_rank}.pt")


def keyed_noise() -> None:
    """Per-sample timesteps and noise seeded by the sample's key and the step (see the module docstring)."""
    from ldm.diffusion import lightning as dl
    from ldm.diffusion.losses import diffusion_loss

    def latents(self: Any, batch: dict, gen: torch.Generator) -> torch.Tensor:
        self._probe_keys = list(batch["key"])
        with torch.no_grad():
            x = batch["image"].to(self.device)
            return self.net.first_stage_model.encode_latents(x, sample=False).float()

    def loss(self: Any, z: torch.Tensor, c: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        ts, noise = [], []
        for key in self._probe_keys:
            g = torch.Generator().manual_seed(zlib.crc32(key.encode()) * 1000 + self.global_step)
            ts.append(torch.randint(0, self.net.alphas_cumprod.numel(), (1,), generator=g))
            noise.append(torch.randn(tuple(z.shape[1:]), generator=g))
        return diffusion_loss(self.net.model, z, {"context": c}, self.net.alphas_cumprod, self.net.parameterization,
                              timesteps=torch.cat(ts), noise=torch.stack(noise))

    dl.LatentDiffusionModule._latents = latents
    dl.LatentDiffusionModule._loss = loss


class MergedLoader:
    """The loaders of ranks 0..N-1 of an N-rank run, read in step: each batch is their batches concatenated."""

    def __init__(self, loaders: list[Any]) -> None:
        self.loaders = loaders

    def __len__(self) -> int:
        return len(self.loaders[0])

    def load_state_dict(self, state: dict) -> None:
        for loader in self.loaders:
            loader.load_state_dict(state)

    def endless(self) -> Any:
        for parts in zip(*(loader.endless() for loader in self.loaders)):
            yield {k: torch.cat([p[k] for p in parts]) if isinstance(parts[0][k], torch.Tensor)
                   else [x for p in parts for x in p[k]] for k in parts[0]}


def merge_ranks(n: int) -> None:
    from ldm.training.datamodule import DataModule

    original = DataModule._loader

    def loader(self: Any, epoch: int, rank: int, world: int, val: bool = False) -> Any:
        if val or world != 1:
            return original(self, epoch, rank, world, val)
        return MergedLoader([original(self, epoch, r, n) for r in range(n)])

    DataModule._loader = loader


def main() -> None:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    if os.environ.get("PROBE_KEYED_NOISE"):
        keyed_noise()
    if os.environ.get("PROBE_MERGE_RANKS"):
        merge_ranks(int(os.environ["PROBE_MERGE_RANKS"]))
    from ldm.cli.train import run

    run(argv, callbacks=[Probe(out)])


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
