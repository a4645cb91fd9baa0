"""Atomic file and folder writing: every output a reader sees is either the old one or the new one, whole.

Results, configs, adapters, merged models and benchmark records are written to a temporary path beside the target,
flushed to disk and renamed over it, so a run killed half-way (or a power cut) never leaves half a file behind and a
resumed run or a sweep can trust whatever it finds. Used by the training engine, its checkpoints, the benchmarks and
the command line.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's entry to disk (folders: so a rename inside them survives a power cut)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders; the rename is still atomic
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """Flush every file and folder under ``root`` to disk, before the folder is renamed into place."""
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_path(os.path.join(folder, name))
        fsync_path(folder)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, flush it to disk and rename it over ``path``.

    A reader (or a run resumed after a kill) sees the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    """Write JSON atomically (see `write_text_atomic`)."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, (set, tuple)):
        return sorted(value) if isinstance(value, set) else list(value)
    return str(value)


def replace_dir_atomic(directory: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Fill a fresh temporary folder with ``write(tmp)``, then swap it in place of ``directory``."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp")
    try:
        write(tmp)
        fsync_tree(tmp)
        old = None
        if directory.exists():
            old = tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".old")
            os.rmdir(old)
            os.replace(directory, old)
        os.replace(tmp, directory)
        fsync_path(directory.parent)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
