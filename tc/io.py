"""Atomic file writes: an interrupted stage never leaves a half-written file that looks complete;
and outputs checked before the work that ends by writing them."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tc.params import UserError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path`` to write to; renamed onto ``path`` if the block succeeds.

    The temp name keeps the extension (savefig and Pillow pick the format from it) and
    starts with a dot; on error it is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes the file private; artifacts are meant to be read like any other file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, obj) -> None:
    """``obj`` as indented JSON with sorted keys (stable diffs of committed metrics)."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def check_output(path: str | Path, flag: str, *, folder: bool = False) -> None:
    """Refuse, before a stage's work, an output it could not write at the end: a folder where
    its file goes (or a file where its folder goes), a file among its parents, a parent folder
    without write permission. Raises UserError naming ``flag``."""
    path = Path(path)
    want, other = ("folder", "file") if folder else ("file", "folder")
    if path.exists() and path.is_dir() != folder:
        raise UserError(f"{flag} {path} is a {other}; expected a {want} there")
    parent = next(p for p in (path if folder else path.parent, *path.parents) if p.exists())
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: no permission to write in {parent}")
