#!/usr/bin/env python
"""Inductor's max-autotune report, from a log, as rows: for each convolution and matmul it tuned, the best Triton
template against the ATen kernel (cuDNN, cuBLAS), and how long the tuning took.

    python scripts/bench.py --compile --skip-eager --only unet --mode max-autotune 2> tune.log
    python scripts/bench_autotune_log.py tune.log --out autotune.jsonl

Inductor prints a block per tuned operation (its top 10 choices, fastest first), then one line with the seconds
spent benchmarking. The ATen kernel's time is there only when it ranked in that top 10: ``aten_ms`` is None
otherwise, and ``aten_in_top`` says which. ``speedup`` is ATen's time over the best Triton template's.
``safe_triton_ms`` and ``safe_speedup`` count only templates of at most 4 warps: for 3×3 convolutions, 8-warp
templates compute wrong results on torch builds without pytorch/pytorch#183989 (ldm/autotune.py).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HEADER = re.compile(r"^AUTOTUNE (\w+)\((.*)\)$")
CHOICE = re.compile(r"^  (\S+) ([0-9.]+) ms\s+[0-9.]+%\s*(.*)$")
TAKES = re.compile(r"AUTOTUNE benchmarking takes ([0-9.]+) seconds.* for (\d+) choices")
STRIDE = re.compile(r"STRIDE_H=(\d+)")
WARPS = re.compile(r"num_warps=(\d+)")
SAFE_WARPS = 4


def parse(lines) -> list[dict]:
    """The tuned operations of a log, in order: op, input shapes and strides, the best Triton template (ms, config,
    and the convolution's stride from its config), the ATen kernel's ms if listed, seconds of benchmarking."""
    rows: list[dict] = []
    cur: dict | None = None
    for line in lines:
        line = line.rstrip("\n")
        if m := HEADER.match(line.strip()):
            cur = dict(op=m.group(1), shapes=m.group(2), strides=None, triton_ms=None, triton_config=None,
                       triton_warps=None, safe_triton_ms=None, conv_stride=None, aten_ms=None, aten_in_top=False,
                       choices=None, benchmark_s=None)
            rows.append(cur)
        elif cur is not None and line.startswith("strides: "):
            cur["strides"] = line[len("strides: "):]
        elif cur is not None and (m := CHOICE.match(line)):
            add_choice(cur, m.group(1), float(m.group(2)), m.group(3))
        elif cur is not None and (m := TAKES.search(line)):
            cur["benchmark_s"], cur["choices"] = float(m.group(1)), int(m.group(2))
            cur = None
    for r in rows:
        r["speedup"] = round(r["aten_ms"] / r["triton_ms"], 3) if r["aten_ms"] and r["triton_ms"] else None
        r["safe_speedup"] = (round(r["aten_ms"] / r["safe_triton_ms"], 3)
                             if r["aten_ms"] and r["safe_triton_ms"] else None)
    return rows


def add_choice(row: dict, name: str, ms: float, config: str) -> None:
    """One listed choice: Triton templates are named ``triton_*``, every other choice is the ATen kernel."""
    if not name.startswith("triton"):
        row["aten_ms"] = ms if row["aten_ms"] is None else min(row["aten_ms"], ms)
        row["aten_in_top"] = True
        return
    w = WARPS.search(config)
    warps = int(w.group(1)) if w else None
    if warps is not None and warps <= SAFE_WARPS and (row["safe_triton_ms"] is None or ms < row["safe_triton_ms"]):
        row["safe_triton_ms"] = ms
    if row["triton_ms"] is None or ms < row["triton_ms"]:
        row["triton_ms"], row["triton_config"], row["triton_warps"] = ms, config.strip(), warps
        m = STRIDE.search(config)
        row["conv_stride"] = int(m.group(1)) if m else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+", type=Path, help="logs of runs with max-autotune")
    p.add_argument("--out", type=Path, default=None, help="write the rows here as JSON lines (default: stdout)")
    a = p.parse_args(argv)
    rows = []
    for path in a.logs:
        if not path.is_file():
            p.error(f"no such log: {path}")
        with path.open(errors="replace") as f:
            found = parse(f)
        if not found:
            print(f"bench_autotune_log: {path}: no AUTOTUNE blocks (was the run compiled with max-autotune?)",
                  file=sys.stderr)
        rows += [dict(what="autotune_choice", log=path.name, **r) for r in found]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if a.out:
        a.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
