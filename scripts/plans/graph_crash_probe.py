#!/usr/bin/env python
"""Probe for the GPU crash first seen in the seventeenth session
(docs/results/gpu-crash-h100-2026-12-07-seventeenth.txt): "CUDA error: unspecified launch failure" when a model
compiled with ``mode="reduce-overhead"`` replayed again after a second compiled model (its deepcopy) had run, in a
process where two models graphed with ``unet_graph=True`` had been used and freed before. One scenario per process
(a CUDA error is sticky), each printed as one line:

    for s in graphed-freed graphed-kept no-graphed; do for c in copy load; do
        python scripts/plans/graph_crash_probe.py --scenario $s --second $c; done; done

``--scenario``: two eager-graphed models first, freed (``graphed-freed``) or kept alive (``graphed-kept``), or none
(``no-graphed``); ``--second``: the second compiled model is a ``copy.deepcopy`` of the first or a model loaded anew.
Then A, B, A are sampled; A's second latents must equal its first exactly.

On an H100 (eighteenth session, docs/results/graph-crash-probe-h100-2026-12-07-eighteenth.txt) both
``graphed-freed`` scenarios crashed and the four others gave "same"; after ``GraphedCall`` cleared cuBLAS's cached
workspaces around its captures (:func:`ldm.cuda_graph.cublas_workspaces_cleared`) both gave "same".
``tests/test_cuda_graph.py`` runs them as GPU tests.
"""
from __future__ import annotations

import argparse
import copy
import gc
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import ldm  # noqa: E402
from ldm.fast import optimize  # noqa: E402

KW = dict(steps=2, height=32, width=32, seed=0, progress=False, output="latent")


def tiny_model() -> ldm.LatentDiffusion:
    """The tiny model as tests/test_left_open_effects.py builds it (every weight shows in the output), on the GPU."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_left_open_effects import tiny_model as build  # noqa: PLC0415

    return build().to("cuda")


def graphed_pair() -> list:
    models = [tiny_model() for _ in range(2)]
    for m in models:
        optimize(m, compile=False, unet_graph=True, fuse_projections=False)
        m.generate("a red apple", **KW)
    return models


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=["graphed-freed", "graphed-kept", "no-graphed"], default="graphed-freed")
    p.add_argument("--second", choices=["copy", "load"], default="copy")
    a = p.parse_args()
    with torch.no_grad():
        kept = graphed_pair() if a.scenario != "no-graphed" else []
        if a.scenario == "graphed-freed":
            kept.clear()
            gc.collect()
        first = tiny_model()
        optimize(first, fuse_projections=False)
        ref = first.generate("a red apple", **KW)
        second = copy.deepcopy(first) if a.second == "copy" else tiny_model()
        if a.second == "load":
            optimize(second, fuse_projections=False)
        second.generate("a red apple", **KW)
        try:
            again = first.generate("a red apple", **KW)
            torch.cuda.synchronize()
            result = "same" if torch.equal(again, ref) else f"differs by {float((again - ref).abs().max()):.3g}"
        except Exception as e:  # noqa: BLE001 - the probe reports whatever the replay raises
            result = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    print(f"scenario={a.scenario} second={a.second}: {result}", flush=True)
    return 0 if result == "same" else 1


if __name__ == "__main__":
    sys.exit(main())
