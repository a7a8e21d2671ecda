"""Reading a run's CSV log (``<run_dir>/logs/metrics.csv``), e.g. to plot a loss curve or compare two runs."""
from __future__ import annotations

import csv
from pathlib import Path


def logged(run_dir: str | Path, key: str) -> dict[int, str]:
    """step -> the logged value of ``key``, kept as text so that two runs compare bit-exactly."""
    out: dict[int, str] = {}
    with open(Path(run_dir) / "logs" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get(key):
                out[int(row["step"])] = row[key]
    return out
