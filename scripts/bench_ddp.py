#!/usr/bin/env python
"""Data-parallel scaling of the SD-v1-sized U-Net training step (ours), synthetic 32×32 latents (256 px).

    torchrun --nproc-per-node N scripts/bench_ddp.py [--batch 32] [--res 32] [--steps 20] [--out FILE]

bf16 autocast, fp32 master weights, fused AdamW, no activation checkpointing, DDP with gradient bucket views; noise
and timesteps drawn per rank. Rank 0 prints one JSON line: images/s per GPU and in total (median step time).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torch.distributed as dist


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--res", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    for flag in ("batch", "res", "steps"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag} must be at least 1, got {getattr(a, flag)}")
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", rank))
    torch.cuda.set_device(local)
    dev = torch.device("cuda", local)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    import ldm

    torch.manual_seed(0)  # identical initial weights on every rank
    model = ldm.load(config="sd/v1-inference.yaml").model.to(dev)
    model.diffusion_model.set_gradient_checkpointing(False)
    model.train()
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local], gradient_as_bucket_view=True,
                                                    static_graph=True)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-5, fused=True)
    g = torch.Generator(device=dev).manual_seed(1000 + rank)
    x = torch.randn(a.batch, 4, a.res, a.res, device=dev, generator=g)
    c = torch.randn(a.batch, 77, 768, device=dev, generator=g)

    def step() -> None:
        t = torch.randint(0, 1000, (a.batch,), device=dev, generator=g)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(ddp(x, t, context=c).float(), x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    times = []
    for _ in range(a.steps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dist.barrier()
        s.record()
        step()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1000)
    med = torch.tensor(statistics.median(times), device=dev)
    dist.all_reduce(med, op=dist.ReduceOp.MAX)
    if rank == 0:
        r = {"what": "ddp_train_step_ldm_unet_sd_v1", "gpus": world, "batch_per_gpu": a.batch, "res": a.res,
             "median_step_s": float(med), "img_per_s_total": a.batch * world / float(med),
             "img_per_s_per_gpu": a.batch / float(med), "device": torch.cuda.get_device_name(),
             "torch": torch.__version__}
        print(json.dumps(r), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(r) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
