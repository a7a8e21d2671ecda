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
from typing import NoReturn

from ldm.cli.paths import folder_problem


def fail(msg: str) -> NoReturn:
    raise SystemExit(f"plot_results.py: error: {msg}")


def labelled(items: list[str]) -> list[tuple[str, Path]]:
    out = []
    for it in items:
        label, sep, path = it.partition("=")
        if not sep or not Path(path).exists():
            fail(f"expected LABEL=PATH with an existing file or run dir, got {it!r}")
        out.append((label, Path(path)))
    return out


CURVE_KEYS = ("fd_clip", "retrieval@1", "fd_clip_real_halves", "real_retrieval@1")


def read_curve(path: Path) -> list[dict]:
    """The snapshots of a curve.json (scripts/evaluate.py), each with ``train_s`` and held-out metrics; a file of
    another shape is an error naming it."""
    try:
        recs = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        fail(f"{path}: not a readable curve.json ({e})")
    try:
        key = next(k for k in recs[0]["metrics"] if k.startswith("heldout/"))
        return [{"train_s": float(r["train_s"]), **{k: float(r["metrics"][key][k]) for k in CURVE_KEYS}}
                for r in recs]
    except (IndexError, KeyError, TypeError, ValueError, AttributeError, StopIteration) as e:
        fail(f"{path}: not a curve.json of scripts/evaluate.py (a list of snapshots with train_s and heldout/* "
             f"metrics {', '.join(CURVE_KEYS)}; {type(e).__name__}: {e})")


def read_loss(run_dir: Path) -> dict[int, float]:
    """step -> ``train/loss`` of a run folder's logs/metrics.csv; a folder without it is an error naming it."""
    from ldm.training.logs import logged  # noqa: PLC0415

    try:
        loss = {step: float(v) for step, v in logged(run_dir, "train/loss").items()}
    except (OSError, UnicodeDecodeError, KeyError, ValueError) as e:
        fail(f"{run_dir}: no readable logs/metrics.csv of a training run ({type(e).__name__}: {e})")
    if not loss:
        fail(f"{run_dir / 'logs' / 'metrics.csv'}: no train/loss logged")
    return loss


def pyplot():
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        fail("needs matplotlib: pip install matplotlib")
    return plt


def plot_curves(curves: list[tuple[str, list[dict]]], out: Path, floor: bool = True) -> None:
    plt = pyplot()
    fig, (ax_fd, ax_r) = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, m in curves:
        t = [r["train_s"] / 60 for r in m]
        ax_fd.plot(t, [x["fd_clip"] for x in m], "o-", label=label)
        ax_r.plot(t, [x["retrieval@1"] for x in m], "o-", label=label)
    if floor:
        ax_fd.axhline(m[-1]["fd_clip_real_halves"], color="gray", ls="--", label="real vs real (floor)")
        ax_r.axhline(m[-1]["real_retrieval@1"], color="gray", ls="--", label="real images")
    ax_fd.set(xlabel="U-Net training, GPU minutes", ylabel="Fréchet distance (CLIP features) ↓", yscale="log",
              title="held-out prompts: distribution")
    ax_r.set(xlabel="U-Net training, GPU minutes", ylabel="caption retrieval@1 ↑",
             title="held-out prompts: text match")
    for ax in (ax_fd, ax_r):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def plot_loss(losses: list[tuple[str, dict[int, float]]], out: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for label, loss in losses:
        ax.plot(list(loss), list(loss.values()), label=label)
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
    problem = folder_problem(Path(a.out).parent)
    if problem or Path(a.out).is_dir():
        p.error(f"--out {a.out}: " + (f"its folder {problem}" if problem else "is a folder, not a file name"))
    read = read_curve if a.what == "curve" else read_loss
    data = [(label, read(path)) for label, path in labelled(a.items)]  # every input checked before plotting
    plt = pyplot()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    (plot_curves if a.what == "curve" else plot_loss)(data, Path(a.out))
    plt.close("all")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
