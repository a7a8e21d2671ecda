"""On a GPU: the text encoder trained with the U-Net (bf16, fused AdamW with two parameter groups, resumed), and
prompt emphasis through the fast path (the text encoder replayed from its CUDA graph) against the eager model.

    python scripts/plans/gpu_joint_emphasis.py OUT_DIR
    LDM_DRY_RUN=1 python scripts/plans/gpu_joint_emphasis.py OUT_DIR     # the same on the CPU, no CUDA graphs
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

import ldm
from ldm.checkpoint import read_state_dict
from ldm.cli.train import run

TINY = "configs/tiny/txt2img.yaml"
DRY = bool(os.environ.get("LDM_DRY_RUN"))
DEVICE, DTYPE = ("cpu", torch.float32) if DRY else ("cuda", torch.float16)


def text_weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in read_state_dict(path)[0].items() if k.startswith("cond_stage_model.")}


def train(out: Path) -> dict:
    accel = ["trainer.accelerator=cpu"] if DRY else ["trainer.accelerator=gpu", "trainer.precision=bf16-mixed"]
    args = ["--config", TINY, *accel, "train.lr=1e-3",
            "train.warmup_steps=0", "train.checkpoint.every_n_steps=10", "trainer.enable_progress_bar=false"]
    run([*args, "--run-dir", str(out / "frozen"), "trainer.max_steps=20"])
    joint = [*args, "model.params.cond_stage_trainable=true", "train.text_encoder_lr=3e-3"]
    run([*joint, "--run-dir", str(out / "straight"), "trainer.max_steps=20"])
    run([*joint, "--run-dir", str(out / "resumed"), "trainer.max_steps=10"])
    trainer = run([*joint, "--run-dir", str(out / "resumed"), "trainer.max_steps=20", "--resume", "auto"])
    frozen, straight = text_weights(out / "frozen" / "model.safetensors"), text_weights(out / "straight" /
                                                                                         "model.safetensors")
    resumed = text_weights(out / "resumed" / "model.safetensors")
    opt = trainer.optimizers[0]
    return {"text_tensors_moved": sum(not torch.equal(frozen[k], straight[k]) for k in frozen),
            "text_tensors": len(frozen), "fused": bool(opt.defaults.get("fused")),
            "groups_lr": [g["lr"] for g in opt.param_groups],
            "resumed_equals_straight": all(torch.equal(resumed[k], straight[k]) for k in straight)}


def emphasis(out: Path) -> dict:
    from ldm.fast import optimize

    path = out / "straight" / "model.safetensors"
    kw = dict(steps=4, seed=0, output="latent", progress=False, emphasis="original")
    prompts = ["a (red:1.4) cat BREAK [blurry]", "(((dog)))"]
    eager = ldm.load(path, device=DEVICE, dtype=DTYPE)
    ref = eager.generate(prompts, **kw)
    fast = ldm.load(path, device=DEVICE, dtype=DTYPE)
    if not DRY:
        optimize(fast, compile=False, unet_graph=True)  # the U-Net and the text encoder replayed from CUDA graphs
    got = [fast.generate(prompts, **kw) for _ in range(2)]
    plain = fast.generate(prompts, **{**kw, "emphasis": None})
    return {"max_abs_diff_graphed_vs_eager": float((got[0] - ref).abs().max()),
            "replays_equal": bool(torch.equal(got[0], got[1])),
            "weighting_changes_the_latents": float((plain - got[0]).abs().max())}


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": "cpu" if DRY else torch.cuda.get_device_name(), "torch": torch.__version__}
    result["joint_text"] = train(out / "runs")
    result["emphasis"] = emphasis(out / "runs")
    (out / "joint-emphasis.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
