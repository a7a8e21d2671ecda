"""Tar shards at the byte level: safe member iteration, sample grouping, a writer, and shard-list expansion.

Members are read from the tar stream into memory, never extracted to disk. Absolute paths, ``..`` components,
links and devices are skipped and counted; extensions outside :data:`DECODED_EXTENSIONS` are skipped unread and
counted, so nothing pickle-based is ever loaded.
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
import re
import subprocess
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from ldm.data.validate import DECODED_EXTENSIONS, Skip, SkipStats, check_member_name, split_key

log = logging.getLogger(__name__)

_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")


def braceexpand(pattern: str) -> list[str]:
    """Expand ``{000..012}`` (zero padding kept) and ``{a,b}`` groups, left to right, like webdataset's URLs."""
    found = [m for m in (_RANGE.search(pattern), _LIST.search(pattern)) if m]
    if not found:
        return [pattern]
    m = min(found, key=lambda m: m.start())
    head, tail = pattern[:m.start()], pattern[m.end():]
    if m.re is _LIST:
        parts = m.group(1).split(",")
    else:
        a, b = m.group(1), m.group(2)
        width = len(a) if a.startswith("0") or len(a) == len(b) else 0
        step = 1 if int(b) >= int(a) else -1
        parts = [str(i).zfill(width) for i in range(int(a), int(b) + step, step)]
    return [x for part in parts for x in braceexpand(head + part + tail)]


def expand_shards(spec: str | os.PathLike | Sequence, allow_pipe: bool = False) -> list[str]:
    """Shard spec → list of shard URLs: a path, a brace pattern, a directory (its ``*.tar``), ``::``-joined
    patterns, or a list of any of these. ``pipe:`` URLs raise unless ``allow_pipe=True`` (they run a shell)."""
    if isinstance(spec, (list, tuple)):
        return [u for s in spec for u in expand_shards(s, allow_pipe)]
    spec = os.fspath(spec)
    urls: list[str] = []
    for part in spec.split("::"):
        if part.startswith("pipe:"):
            if not allow_pipe:
                raise ValueError(f"shard spec {part!r} is a pipe: URL, which runs a shell command; "
                                 "pass allow_pipe=True to allow it")
            urls.append(part)
        elif os.path.isdir(part):
            urls.extend(sorted(str(p) for p in Path(part).glob("*.tar")))
        else:
            urls.extend(braceexpand(part))
    if not urls:
        raise ValueError(f"shard spec {spec!r} matched no shards")
    return urls


def _open_stream(url: str, allow_pipe: bool):
    """Open a shard for reading: a local file, or (only with ``allow_pipe``) the stdout of a shell command."""
    if url.startswith("pipe:"):
        if not allow_pipe:
            raise ValueError(f"shard {url!r} is a pipe: URL; pass allow_pipe=True to allow it")
        proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE)  # noqa: S602 - explicit opt-in
        return proc.stdout, proc
    if url.startswith("file:"):
        url = url[5:]
    if not os.path.exists(url):
        raise FileNotFoundError(f"shard {url!r} does not exist")
    return open(url, "rb"), None


def iter_members(url: str, stats: SkipStats, allow_pipe: bool = False) -> Iterator[tuple[str, bytes]]:
    """Yield ``(name, bytes)`` for safe regular members with a decoded extension; count everything else."""
    stream, proc = _open_stream(url, allow_pipe)
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                try:
                    check_member_name(info.name)
                    if not info.isfile():
                        raise Skip("unsafe_member" if (info.issym() or info.islnk() or info.isdev())
                                   else "ignored_member", info.name)
                    if split_key(info.name)[1] not in DECODED_EXTENSIONS:
                        raise Skip("ignored_extension", info.name)
                except Skip as s:
                    if s.reason != "ignored_member":  # directories are normal in tars: not counted
                        stats.skip(s.reason, f"{url}:{info.name}")
                    continue
                yield info.name, tar.extractfile(info).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        stats.skip("corrupt_shard", url)
        log.warning("shard %s is corrupt after the samples already read: %s", url, e)
    finally:
        stream.close()
        if proc is not None:
            proc.wait()


def iter_raw_samples(url: str, stats: SkipStats, allow_pipe: bool = False) -> Iterator[dict]:
    """Group consecutive members by key → ``{"__key__": key, "__url__": url, ext: bytes, …}``."""
    current: dict | None = None
    n = 0
    for name, data in iter_members(url, stats, allow_pipe):
        key, ext = split_key(name)
        if current is not None and current["__key__"] != key:
            n += 1
            yield current
            current = None
        if current is None:
            current = {"__key__": key, "__url__": url}
        current[ext] = data
    if current is not None:
        n += 1
        yield current
    if n == 0:
        stats.skip("empty_shard", url)
        log.warning("shard %s holds no samples", url)


class ShardWriter:
    """Write samples ``{"__key__": str, ext: bytes|str}`` into ``pattern % index`` tars, rolling over at
    ``max_count`` samples or ``max_size`` bytes. Members get mtime 0 and sorted extensions (reproducible).

    Each shard is written as ``<name>.partial`` and renamed when finished, so a reader (or a later run) never sees a
    half-written shard: leaving the ``with`` block through an exception deletes the unfinished one."""

    def __init__(self, pattern: str, max_count: int = 10000, max_size: int = 1 << 30, start: int = 0):
        if "%" not in pattern:
            raise ValueError(f"shard pattern {pattern!r} needs a %-format index, e.g. 'train-%06d.tar'")
        self.pattern, self.max_count, self.max_size = pattern, int(max_count), int(max_size)
        self.index, self.shards, self.counts = start, [], []
        self._tar = None
        self._count = self._size = 0
        self._last_key: str | None = None

    def _roll(self) -> None:
        self.close()
        path = self.pattern % self.index
        self.index += 1
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._tar = tarfile.open(partial_path(path), "w", format=tarfile.USTAR_FORMAT)
        self.shards.append(path)
        self.counts.append(0)
        self._count = self._size = 0

    def write(self, sample: dict) -> None:
        """Append one sample; its members are named ``key.ext``."""
        key = sample["__key__"]
        check_member_name(key)
        if "." in posixpath.basename(key) or key == self._last_key:
            raise ValueError(f"sample key {key!r} would not read back as one sample (readers split member names at "
                             "the first dot and merge equal neighbouring keys): use shard_key()")
        self._last_key = key
        members = {k: (v.encode("utf-8") if isinstance(v, str) else v)
                   for k, v in sample.items() if not k.startswith("__")}
        size = sum(len(v) + 512 for v in members.values())
        if self._tar is None or self._count >= self.max_count or (self._count and self._size + size > self.max_size):
            self._roll()
        for ext in sorted(members):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(members[ext]), 0, 0o644
            self._tar.addfile(info, io.BytesIO(members[ext]))
        self._count += 1
        self._size += size
        self.counts[-1] += 1

    def close(self) -> None:
        """Finish the current shard: its ``.partial`` file becomes ``pattern % index``."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            os.replace(partial_path(self.shards[-1]), self.shards[-1])

    def abort(self) -> None:
        """Drop the unfinished shard (its ``.partial`` file); the finished ones stay."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            Path(partial_path(self.shards[-1])).unlink(missing_ok=True)
            self.shards.pop()
            self.counts.pop()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()


def shard_key(key: str, used: set[str]) -> str:
    """``key`` as a shard sample key that reads back whole and alone: dots become ``_`` (readers split a member name
    at its first dot) and a key already in ``used`` gets ``_1``, ``_2``, … (readers merge equal neighbouring keys,
    e.g. ``img.png`` and ``img.jpg`` of one folder). The key returned is added to ``used``."""
    base = key.replace(".", "_")
    out, n = base, 0
    while out in used:
        n += 1
        out = f"{base}_{n}"
    used.add(out)
    return out


def partial_path(path: str) -> str:
    """Where :class:`ShardWriter` writes the shard ``path`` until it is finished."""
    return f"{path}.partial"


def shard_pattern(out_dir: str | os.PathLike, prefix: str) -> str:
    """``out_dir/prefix-%06d.tar``."""
    return os.path.join(os.fspath(out_dir), f"{prefix}-%06d.tar")


def move_split_shards(aside: str | os.PathLike, out: str | os.PathLike, split: str) -> list[str]:
    """Replace ``out``'s shards of ``split`` (``split-*.tar``, which directory readers would pick up) by those
    written in ``aside``; their file names, in order."""
    aside, out = Path(aside), Path(out)
    for old in out.glob(f"{split}-*.tar"):
        old.unlink()
    names = []
    for shard in sorted(aside.glob(f"{split}-*.tar")):
        shard.replace(out / shard.name)
        names.append(shard.name)
    return names
