"""Checks on the paths the command-line scripts are given, before any work is done."""
from __future__ import annotations

import os
from pathlib import Path


def folder_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be (or become) an output folder: it, or the first of its parents that exists, is a file.
    None when it can."""
    out = Path(path)
    for parent in (out, *out.parents):
        if parent.exists():
            if parent.is_dir():
                return None
            return "exists and is not a folder" if parent == out else f"cannot be made: {str(parent)!r} is a file"
    return None
