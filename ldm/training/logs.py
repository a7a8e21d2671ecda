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



def resumable_csv_logger(run_dir: str | Path) -> Any:
    """Lightning's ``CSVLogger`` writing ``<run_dir>/logs/metrics.csv`` that keeps an earlier part of the run.

    Lightning's writer deletes an existing ``metrics.csv`` when it starts, so ``--resume`` would lose every metric
    logged before the checkpoint. This one keeps the file: the first rows the new process saves replace the old rows
    from the first one (in the order they were logged) at or after their first step on (what an interrupted run
    logged after its last checkpoint, which the resumed run logs again; a new run from step 0 replaces them all),
    and the earlier rows stay, under the old header (Lightning's writer widens it when new keys come). The cut is
    at the first old row at or after that step holding one of the new rows' keys, not at the step alone:
    validation is logged at the optimizer step (``val/*`` at step N, just before the checkpoint of step N), the
    training metrics under Lightning's batch count (the resumed run's first row is at N too), so a cut at step N
    would drop the checkpoint step's validation, which the resumed run does not run again
    (:class:`ldm.training.validation.Validation`); with gradient accumulation the ``val/*`` steps run behind the
    batch count, and a validation row logged after the checkpoint (after the cut) goes too, though its step is lower."""
    from lightning.pytorch.loggers import CSVLogger  # noqa: PLC0415
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter  # noqa: PLC0415

    class KeepingWriter(ExperimentWriter):
        def _check_log_dir_exists(self) -> None:  # Lightning's deletes metrics.csv here
            self.kept = read_rows(Path(self.metrics_file_path))

        def save(self) -> None:
            if self.metrics and self.kept is not None:
                header, rows = self.kept
                first = min(int(m["step"]) for m in self.metrics)
                keys = {k for m in self.metrics for k in m if k != "step"}
                write_rows(Path(self.metrics_file_path), header, rows_before(rows, first, keys))
                self.metrics_keys, self.kept = list(header), None
            super().save()

    class KeepingCSVLogger(CSVLogger):
        @property
        def experiment(self) -> ExperimentWriter:
            if self._experiment is None:
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = KeepingWriter(log_dir=self.log_dir)
            return self._experiment

    return KeepingCSVLogger(run_dir, name="logs", version="")


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]] | None:
    """(header, rows) of a CSV file; None where there is no file."""
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def rows_before(rows: list[dict[str, str]], first: int, keys: set[str]) -> list[dict[str, str]]:
    """The rows (in the order they were logged) before the first one at step ``first`` or later that holds any of
    ``keys`` (a row of the same series, on the same step axis, as the new rows)."""
    for i, row in enumerate(rows):
        if int(float(row["step"])) >= first and any(row.get(k) for k in keys):
            return rows[:i]
    return rows


def write_rows(path: Path, header: list[str], rows: list[dict[str, str]]) -> None:
    """Replace ``path`` with ``header`` and ``rows``, through a temporary file (never half-written)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
