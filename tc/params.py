"""Reading params.yaml with errors that name the file and the missing key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml


def load_params(path: str | Path, *sections: str) -> dict:
    """Load ``path`` and check that each of ``sections`` is present; returns the whole dict."""
    path = Path(path)
    try:
        params = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"params file {path} not found") from None
    except yaml.YAMLError as err:
        raise SystemExit(f"params file {path} is not valid YAML: {err}") from None
    if not isinstance(params, dict):
        raise SystemExit(f"params file {path} must hold a mapping of sections, got {type(params).__name__}")
    missing = [s for s in sections if not isinstance(params.get(s), dict)]
    if missing:
        raise SystemExit(f"params file {path} lacks section(s) {', '.join(missing)}")
    return params


def require(section: dict, name: str, keys: dict[str, type]) -> dict:
    """Return ``section`` after checking each key exists with the expected type."""
    for key, kind in keys.items():
        if key not in section:
            raise SystemExit(f"params: {name}.{key} is missing (expected {kind.__name__})")
        value = section[key]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            raise SystemExit(f"params: {name}.{key} = {value!r}, expected {kind.__name__}")
    return section


def dataclass_from_dict(cls, d: dict, section: str):
    """Build dataclass ``cls`` from a params section, naming unknown keys (typos would be silently ignored)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {section} config keys {unknown}; known: {sorted(known)}")
    return cls(**d)
