#!/usr/bin/env python
"""Run a list of bench.py commands within one time budget (a lent GPU call of at most 10 minutes, say).

    python scripts/bench_plan.py plan.txt --out "$OUT" --total-s 575

Each line of the plan is ``LABEL LIMIT_S ARGS...`` (``#`` starts a comment): ``python scripts/bench.py ARGS --label
LABEL --out OUT/LABEL.jsonl`` runs with a time limit of LIMIT_S seconds or what is left of the budget, whichever is
less; its output goes to ``OUT/LABEL.log`` (both files replaced where an earlier run left them). A run that would
get less than ``--min-s`` seconds is skipped, and said so. The plan is checked whole before anything runs (labels
unique and usable as file names, limits positive integers). One line per run on stdout: label, exit status (124:
cut by its limit), seconds, rows written.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class PlanError(ValueError):
    pass


def read_plan(path: Path) -> list[tuple[str, int, list[str]]]:
    """The plan's runs as (label, limit in seconds, bench.py arguments); a bad line raises naming it."""
    runs, seen = [], set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        words = shlex.split(line, comments=True)
        if not words:
            continue
        where = f"{path}:{n}"
        if len(words) < 2 or not words[1].isdigit() or int(words[1]) < 1:
            raise PlanError(f"{where}: expected 'LABEL LIMIT_S ARGS...' with a positive whole number of seconds, "
                            f"got {line.strip()!r}")
        label = words[0]
        if not LABEL.fullmatch(label):
            raise PlanError(f"{where}: label {label!r} must be letters, digits, '_', '.' or '-' (it names files)")
        if label in seen:
            raise PlanError(f"{where}: label {label!r} is used twice")
        seen.add(label)
        runs.append((label, int(words[1]), words[2:]))
    if not runs:
        raise PlanError(f"{path}: no runs")
    return runs


def run_plan(runs: list[tuple[str, int, list[str]]], out: Path, total_s: float, min_s: float = 30.0,
             script: Path = ROOT / "scripts" / "bench.py") -> list[dict]:
    """Run each in turn within ``total_s``; returns one status dict per run (skipped ones included)."""
    out.mkdir(parents=True, exist_ok=True)
    start, done = time.monotonic(), []
    for label, limit, args in runs:
        left = total_s - (time.monotonic() - start)
        if left < min_s:
            done.append(dict(label=label, status="skipped", left_s=round(left, 1)))
            print(f"{label}: skipped, {left:.0f} s of the budget left (< {min_s:.0f})", flush=True)
            continue
        t0, rows = time.monotonic(), out / f"{label}.jsonl"
        rows.unlink(missing_ok=True)  # bench.py appends: rows of an earlier plan run in this folder would mix in
        rc = run_one([sys.executable, str(script), *args, "--label", label, "--out", str(rows)], out / f"{label}.log",
                     min(limit, left))
        n = len(rows.read_text().splitlines()) if rows.exists() else 0
        done.append(dict(label=label, status=rc, seconds=round(time.monotonic() - t0, 1), rows=n))
        print(f"{label}: exit {rc} after {time.monotonic() - t0:.0f} s, {n} rows", flush=True)
    return done


def run_one(cmd: list[str], log_path: Path, limit_s: float) -> int:
    """``cmd``'s exit status, or 124 when it ran past ``limit_s``: then its whole process group is killed (inductor's
    compile workers with it, which would otherwise take the CPU from the next run)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return 124


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("plan", type=Path)
    p.add_argument("--out", type=Path, required=True, help="folder for LABEL.jsonl and LABEL.log")
    p.add_argument("--total-s", type=float, default=575.0, help="the budget for all runs (default 575 s)")
    p.add_argument("--min-s", type=float, default=30.0, help="skip a run that would get less than this")
    a = p.parse_args(argv)
    try:
        runs = read_plan(a.plan)
    except (OSError, PlanError) as e:
        p.error(str(e))
    done = run_plan(runs, a.out, a.total_s, a.min_s)
    return 0 if all(d["status"] == 0 for d in done) else 1


if __name__ == "__main__":
    sys.exit(main())
