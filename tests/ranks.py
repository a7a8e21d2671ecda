"""Multi-process training jobs run from the tests: what a failed job said, kept whole.

A job of several ranks shares one stderr. When one rank dies (a C++ abort, a signal), its own message is often above
the other ranks' tracebacks, which are what a tail shows. :func:`run_job` runs the job with Python's fault handler on
(a fatal signal prints every thread's stack), keeps the whole stderr in a file beside the run folder
(``stderr_file``), and :func:`why` says where it is, with the lines that name a crash and the tail."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

# a C++ abort, a fatal signal (the fault handler's stacks), and each rank's exception line (a rank that raised and
# then aborted at exit shows its error only here: the other ranks' tracebacks come after it)
CRASH_WORDS = ("terminate called", "what():", "Fatal Python error", "Aborted", "Segmentation fault", "Signal",
               "signal", "core dumped", "Current thread", "Thread 0x", "Error: ", "Exception: ")


def run_job(cmd: list[str], run_dir: Path, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """``cmd`` (a training job writing to ``run_dir``) with one thread per rank and the fault handler on; its stderr
    also written to ``<run_dir>.stderr.txt`` beside the run folder."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    log = run_dir.parent / f"{run_dir.name}.stderr.txt"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(r.stderr)
    r.stderr_file = log
    return r


def why(r: subprocess.CompletedProcess, tail: int = 2000) -> str:
    """A failed job's exit status, its stderr's crash lines (every rank's) and tail, and where the whole of it is."""
    crash = [ln for ln in r.stderr.splitlines() if any(w in ln for w in CRASH_WORDS)]
    return (f"exit status {r.returncode}; whole stderr in {r.stderr_file}\n--- crash lines:\n" + "\n".join(crash[:40])
            + f"\n--- tail:\n{r.stderr[-tail:]}")
