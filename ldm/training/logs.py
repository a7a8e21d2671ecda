"""A run's CSV log (``<run_dir>/logs/metrics.csv``): written across resumes, read to plot or compare runs."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any


def logged(run_dir: str | Path, key: str) -> dict[int, str]:
    """step -> the logged value of ``key``, kept as text so that two runs compare bit-exactly."""
    out: dict[int, str] = {}
    with open(Path(run_dir) / "logs" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get(key):
                out[int(row["step"])] = row[key]
    return out


def resumable_csv_logger(run_dir: str | Path, resuming: bool = True) -> Any:
    """Lightning's ``CSVLogger`` writing ``<run_dir>/logs/metrics.csv`` that keeps an earlier part of the run.

    Lightning's writer deletes an existing ``metrics.csv`` when it starts, so ``--resume`` would lose every metric
    logged before the checkpoint. This one keeps the file, and the new process's rows replace the old ones series by
    series: the first time it saves a metric (a key: ``train/loss``, ``val/loss``, ``lr-AdamW``, ...), the old
    values of that metric at its first step and after go (what an interrupted run logged after its last checkpoint,
    which the resumed run logs again), the other old values stay, under the old header (Lightning's writer widens it
    when new keys come), and rows left empty go. A run that does not resume (``resuming`` False: a new run from step 0
    in a folder an earlier run logged in) keeps none of the old rows: its first save starts the file afresh, as
    Lightning's writer does (series by series, the old series it logs later or not at all, such as ``val/*``, would
    read as its own).

    Each series from its own first step: the training rows of step N are logged during step N, ``val/*`` of step N
    after it, just before the checkpoint of step N (:class:`ldm.training.validation.Validation`, which the resumed
    run does not run again), so a run resumed at N logs its first training row at N and its first validation later,
    and the order in which the resumed process logs and saves its rows plays no part. Under gradient accumulation
    the training rows count optimizer steps too (one row a step, :func:`ldm.training.step_log.log_step`), so every
    series is on the checkpoints' axis. The cut used to be one for all series: the old rows from the first one (in
    the order logged) at or after the new rows' first step that held one of their metrics. That dropped the
    checkpoint step's validation, and older rows logged after it, when the first rows saved held a training row of
    step N and a ``val/*`` row (sparse logging; a training row that reached the host late, as from a GPU); and it
    kept a ``val/*`` row logged after the checkpoint when they held training rows only, so the resumed run wrote
    that row a second time."""
    from lightning.pytorch.loggers import CSVLogger  # noqa: PLC0415
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter  # noqa: PLC0415

    class KeepingWriter(ExperimentWriter):
        def _check_log_dir_exists(self) -> None:  # Lightning's deletes metrics.csv here
            kept = read_rows(Path(self.metrics_file_path)) if resuming else None
            self.old_rows = len(kept[1]) if kept is not None else None  # the file's first rows: the earlier run's
            self.firsts: dict[str, int] = {}  # metric -> the first step this process saved it at
            self.fresh = not resuming  # a new run: an earlier run's file goes at the first save
            if kept is not None:
                self.metrics_keys = list(kept[0])

        def save(self) -> None:
            if self.metrics and self.fresh:
                Path(self.metrics_file_path).unlink(missing_ok=True)
                self.fresh = False
            if self.metrics and self.old_rows is not None:
                firsts = new_series(self.metrics, self.firsts)
                if firsts:
                    self.firsts.update(firsts)
                    self.old_rows = replace_series(Path(self.metrics_file_path), self.old_rows, firsts)
            super().save()

    class KeepingCSVLogger(CSVLogger):
        @property
        def experiment(self) -> ExperimentWriter:
            if self._experiment is None:
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = KeepingWriter(log_dir=self.log_dir)
            return self._experiment

    return KeepingCSVLogger(run_dir, name="logs", version="")


def new_series(rows: list[dict[str, Any]], known: dict[str, int]) -> dict[str, int]:
    """metric -> its first (lowest) step in ``rows``, for the metrics of ``rows`` not in ``known``."""
    out: dict[str, int] = {}
    for row in rows:
        step = int(row["step"])
        for key, value in row.items():
            if key != "step" and key not in known and value is not None and value != "":
                out[key] = min(out.get(key, step), step)
    return out


def replace_series(path: Path, old: int, firsts: dict[str, int]) -> int:
    """Drop, from the first ``old`` rows of the CSV ``path`` (an earlier run's), the values of each metric in ``firsts``
    at its step there and after, and the rows left without a metric; returns how many of those rows are left."""
    header, rows = read_rows(path) or ([], [])
    kept = [row for row in (without(row, firsts) for row in rows[:old]) if has_metric(row)]
    write_rows(path, header, kept + rows[old:])
    return len(kept)


def without(row: dict[str, str], firsts: dict[str, int]) -> dict[str, str]:
    """``row`` with the values of the metrics in ``firsts`` emptied where its step is at or after theirs."""
    step = int(float(row["step"]))
    return {k: "" if k in firsts and step >= firsts[k] else v for k, v in row.items()}


def has_metric(row: dict[str, str]) -> bool:
    """Whether ``row`` holds a value besides its step and epoch."""
    return any(v not in (None, "") for k, v in row.items() if k not in ("step", "epoch"))


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]] | None:
    """(header, rows) of a CSV file; None where there is no file."""
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def write_rows(path: Path, header: list[str], rows: list[dict[str, str]]) -> None:
    """Replace ``path`` with ``header`` and ``rows``, through a temporary file (never half-written)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
