"""A run's logs across resumes: the CSV log (``<run_dir>/logs/metrics.csv``, read to plot or compare runs) and the
TensorBoard event files (``<run_dir>/tb/``)."""
from __future__ import annotations

import csv
import logging
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

log = logging.getLogger(__name__)


class ResumePoint(NamedTuple):
    """The checkpoint a run continues from, as its logs need it: its ``global_step`` and its save time
    (``ldm_saved_at``, Unix seconds; None for a checkpoint of an ldm that did not record it)."""

    step: int
    saved_at: float | None


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


def resumable_tensorboard_logger(run_dir: str | Path, resuming: bool = False,
                                 resumed_from: ResumePoint | None = None) -> Any:
    """Lightning's ``TensorBoardLogger`` writing ``<run_dir>/tb/`` in which a resumed run hides what the interrupted
    run logged after its checkpoint, and a new run hides an earlier run's points.

    The event files of the interrupted run stay, and readers take a folder's files in the order of their names (their
    creation time), so the new process's file comes last. A run resumed from the checkpoint of step G
    (``resumed_from``) starts it with the ``SummaryWriter``'s ``purge_step`` G: a restart marker (``SessionLog.START``)
    at G, after which readers drop every point at step G and after that the earlier files hold. G is the first step
    the resumed run logs again: its first training row is that of step G (training rows are logged under the index of
    their optimizer step, during it: :mod:`ldm.training.step_log`), its first ``val/*`` comes later. The purge also
    drops the points of step G logged before the checkpoint: ``val/*`` and the sample images of step G are logged at
    the step, after its last batch and just before its checkpoint (:class:`ldm.training.validation.Validation`), and
    the resumed run does not log them again. So right after the marker the new file holds them again, with their
    wall times: the points at step G that the earlier files hold from before the checkpoint's save time
    (:func:`restated_points`; none for a checkpoint without one, whose step-G validation is then hidden). A purge at
    G + 1 would keep them, and with them the interrupted run's training row of step G beside the resumed run's.

    A run that does not resume (``resuming`` False: a new run from step 0 in a folder an earlier run logged in) starts
    its file with ``purge_step`` 0: every earlier point is hidden, as the CSV log starts afresh; the files stay on
    disk. A resumed run whose checkpoint step is unknown (``resuming`` without ``resumed_from``) purges nothing.

    TensorBoard's Python reader (``EventAccumulator``, ``tensorboard --load_fast=false``) follows the marker; its Rust
    data server (the default where it is installed) ignores it by its source (not tested here), and drops instead,
    series by series, a series' points from the step that series is logged at again; a point the resumed run never
    logs again stays there (the interrupted run's throughput of step G: the resumed process has none for its first
    step)."""
    from lightning.fabric.loggers.logger import rank_zero_experiment  # noqa: PLC0415
    from lightning.pytorch.loggers import TensorBoardLogger  # noqa: PLC0415

    class ResumingTensorBoardLogger(TensorBoardLogger):
        @property
        @rank_zero_experiment
        def experiment(self) -> Any:
            if self._experiment is not None:
                return self._experiment
            points = restated_points(Path(self.log_dir), resumed_from) if resumed_from is not None else []
            writer = super().experiment  # the new event file, opened with the marker (rank 0 only)
            if points:
                write_points(writer, resumed_from.step, points)
                log.info("TensorBoard: resumed at step %d; kept %s of that step, logged before its checkpoint",
                         resumed_from.step, ", ".join(sorted({value.tag for _, value in points})))
            return writer

    purge = purge_step(resuming, resumed_from)
    return ResumingTensorBoardLogger(run_dir, name="tb", version="", **({} if purge is None else {"purge_step": purge}))


def purge_step(resuming: bool, resumed_from: ResumePoint | None) -> int | None:
    """The first step whose earlier points TensorBoard hides (:func:`resumable_tensorboard_logger`): the checkpoint's
    step for a resumed run, 0 for a new one, None (nothing hidden) for a resumed run whose checkpoint step is
    unknown."""
    if resumed_from is not None:
        return resumed_from.step
    return None if resuming else 0


def restated_points(log_dir: Path, resumed_from: ResumePoint) -> list[tuple[float, Any]]:
    """(wall time, ``Summary.Value``) of the points at the checkpoint's step that the event files of ``log_dir`` hold
    from before its save time, the one a reader shows of each tag; none without a save time."""
    if resumed_from.saved_at is None:
        return []
    shown: dict[str, tuple[float, Any]] = {}
    for path in event_files(log_dir):
        for event in events(path):
            follow(shown, event, resumed_from.step)
    return [(wall, value) for wall, value in shown.values() if wall <= resumed_from.saved_at]


def follow(shown: dict[str, tuple[float, Any]], event: Any, step: int) -> None:
    """Update ``shown`` (tag -> the point at ``step`` that readers show, so far) with the run's next ``event``: a
    restart marker at or before ``step`` drops them all, a point of a tag before ``step`` drops that tag's (the series
    restarted before it), a point at ``step`` replaces it."""
    from tensorboard.compat.proto.event_pb2 import SessionLog  # noqa: PLC0415

    if event.step > step:
        return
    if event.HasField("session_log") and event.session_log.status == SessionLog.START:
        shown.clear()
    for value in event.summary.value:
        if event.step == step:
            shown[value.tag] = (event.wall_time, value)
        else:
            shown.pop(value.tag, None)


def write_points(writer: Any, step: int, points: list[tuple[float, Any]]) -> None:
    """Write ``points`` (wall time, ``Summary.Value``) at ``step`` with their own wall times through ``writer`` (a
    ``SummaryWriter``)."""
    from tensorboard.compat.proto.event_pb2 import Event  # noqa: PLC0415
    from tensorboard.compat.proto.summary_pb2 import Summary  # noqa: PLC0415

    file_writer = writer._get_file_writer()  # torch's and tensorboardX's SummaryWriter: the one writing its file
    for wall, value in points:
        file_writer.add_event(Event(summary=Summary(value=[value])), step=step, walltime=wall)


def event_files(log_dir: Path) -> list[Path]:
    """The event files of a TensorBoard run folder, in the order readers take them (by name)."""
    return sorted(p for p in log_dir.glob("*tfevents*") if p.is_file())


def events(path: Path) -> Iterator[Any]:
    """The ``Event`` protos of an event file, up to the first one that cannot be parsed."""
    from google.protobuf.message import DecodeError  # noqa: PLC0415
    from tensorboard.compat.proto.event_pb2 import Event  # noqa: PLC0415

    for record in records(path):
        try:
            yield Event.FromString(record)
        except DecodeError:
            return


def records(path: Path) -> Iterator[bytes]:
    """The records of a TFRecord file (an event file), up to the first one cut short or whose length fails its
    checksum (a file still being written, or whose writer was killed), where TensorBoard's readers stop too. The data's
    checksums are not checked: TensorBoard's reader without TensorFlow computes them in Python, byte by byte (about
    9 MB/s: minutes for a folder of sample images)."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c  # noqa: PLC0415

    with open(path, "rb") as f:
        while len(head := f.read(12)) == 12:
            (length,), (check,) = struct.unpack("<Q", head[:8]), struct.unpack("<I", head[8:])
            if check != masked_crc32c(head[:8]):
                return
            data = f.read(length)
            if len(data) < length or len(f.read(4)) < 4:
                return
            yield data
