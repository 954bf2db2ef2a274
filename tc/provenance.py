"""Which code wrote a persisted output folder.

DVC keeps `persist` outputs (demo shards, last.pt) across reruns so that a killed stage
resumes. But DVC also reruns a stage when its code changed, and resuming then would keep
what the old code made (a finished last.pt would even skip training altogether). So the
stages record a digest of the code they run in the folder, and, run by DVC
(--restart-if-changed), start afresh when the recorded digest is not theirs.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from tc.io import write_text_atomic

DIGEST_FILE = ".code-digest"


def code_digest(script: str | Path) -> str:
    """SHA-256 over ``script`` and every loaded module of the ``tc`` package (their names and contents)."""
    files = {Path(script).resolve()}
    for name, module in list(sys.modules.items()):
        if (name == "tc" or name.startswith("tc.")) and getattr(module, "__file__", None):
            files.add(Path(module.__file__).resolve())
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(f"{path.parent.name}/{path.name}\0".encode() + path.read_bytes() + b"\0")
    return digest.hexdigest()


def recorded_digest(folder: str | Path) -> str | None:
    """The digest recorded in ``folder`` (None when there is none: a folder of older code)."""
    path = Path(folder) / DIGEST_FILE
    return path.read_text().strip() if path.is_file() else None


def record_digest(folder: str | Path, digest: str) -> None:
    write_text_atomic(Path(folder) / DIGEST_FILE, digest + "\n")
