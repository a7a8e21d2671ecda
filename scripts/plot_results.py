#!/usr/bin/env python
"""Pictures for docs/RESULTS.md from the files a GPU run writes (needs matplotlib: pip install matplotlib).

    python scripts/plot_results.py curve --out docs/results/curve.png \
        "own CLIP=runs/emoji/eval/curve.json" "MiniLM=runs/emoji/eval-minilm/curve.json" ...
    python scripts/plot_results.py loss --out docs/results/loss.png "own CLIP=runs/emoji/unet" ...

``curve``: held-out Fréchet distance and caption retrieval@1 (first sampler of each snapshot) against training
seconds, one line per LABEL=curve.json. ``loss``: the logged ``train/loss`` against step, one line per LABEL=run dir.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def labelled(items: list[str]) -> list[tuple[str, Path]]:
    out = []
    for it in items:
        label, sep, path = it.partition("=")
        if not sep or not Path(path).exists():
            raise SystemExit(f"plot_results.py: expected LABEL=PATH with an existing file or run dir, got {it!r}")
        out.append((label, Path(path)))
    return out


def plot_curves(items: list[tuple[str, Path]], out: Path, floor: bool = True) -> None:
    import matplotlib.pyplot as plt

    fig, (ax_fd, ax_r) = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, path in items:
        recs = json.loads(path.read_text(encoding="utf-8"))
        key = next(k for k in recs[0]["metrics"] if k.startswith("heldout/"))
        t = [r["train_s"] / 60 for r in recs]
        m = [r["metrics"][key] for r in recs]
        ax_fd.plot(t, [x["fd_clip"] for x in m], "o-", label=label)
        ax_r.plot(t, [x["retrieval@1"] for x in m], "o-", label=label)
    if floor:
        ax_fd.axhline(m[-1]["fd_clip_real_halves"], color="gray", ls="--", label="real vs real (floor)")
        ax_r.axhline(m[-1]["real_retrieval@1"], color="gray", ls="--", label="real images")
    ax_fd.set(xlabel="U-Net training, GPU minutes", ylabel="Fréchet distance (CLIP features) ↓", yscale="log",
              title="held-out prompts: distribution")
    ax_r.set(xlabel="U-Net training, GPU minutes", ylabel="caption retrieval@1 ↑", title="held-out prompts: text match")
    for ax in (ax_fd, ax_r):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def plot_loss(items: list[tuple[str, Path]], out: Path) -> None:
    import matplotlib.pyplot as plt

    from ldm.training.logs import logged

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for label, run_dir in items:
        loss = logged(run_dir, "train/loss")
        ax.plot(list(loss), [float(v) for v in loss.values()], label=label)
    ax.set(xlabel="step", ylabel="train/loss (ε-MSE)", yscale="log", title="U-Net training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["curve", "loss"])
    p.add_argument("items", nargs="+", help="LABEL=FILE")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    items = labelled(a.items)
    (plot_curves if a.what == "curve" else plot_loss)(items, Path(a.out))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
