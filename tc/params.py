"""Reading params.yaml into typed, range-checked config dataclasses.

Each params section has one frozen dataclass beside the code that uses it (DemosConfig in
tc/demos.py, ModelConfig in tc/model.py, TrainConfig in tc/train.py, EvaluateConfig in
tc/evaluate.py, OodConfig in tc/ood.py, SafetyConfig in tc/safety.py, PlotsConfig in
tc/plots.py). A field declares its allowed values with :func:`param`; the field's type
annotation is its expected type. ``check_fields`` (called by every config's
``__post_init__``) enforces both, so a config built in code is checked like one read
from params.yaml, and every error is one line naming ``section.key``, the value, the
expected type and the range.

Defaults: params.yaml gives every key; the dataclass defaults equal params.yaml's values
(tests/test_params.py fails when they drift apart), so a key left out of a user's
params.yaml means what the shipped params.yaml says.

Errors in what a user gave (params, files, flags) are :class:`UserError`; the stages and
the ``tc`` command report them as one line without a traceback (:func:`user_errors`), and
so a stop by Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import multiprocessing as mp
import os
import re
import signal
import sys
import threading
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml


class UserError(Exception):
    """A problem with the user's input (a param, a file, a flag): shown as one line, no traceback."""


class ConfigError(UserError, ValueError):
    """A params value of the wrong type or out of range, an unknown or a missing key."""


class FileFormatError(UserError, ValueError):
    """A file a stage reads (JSON, CSV) that does not have the expected content."""


def param(default: Any, *, ge=None, gt=None, le=None, lt=None, choices=None, speed: bool = False,
          thoughts: bool = False, in_params: bool = True) -> Any:  # fmt: skip
    """A config field with its allowed values.

    ``ge``/``gt``/``le``/``lt``: bounds of a number (of each item of a list); ``choices``:
    the allowed values. ``speed``: the setting changes how fast results come, never the
    results (threads, device, workers, evaluation batch size), so no DVC stage lists it in
    ``params:``. ``thoughts``: only an agent with thoughts (TC) reads it, so BC's training
    does not depend on it. ``in_params``: False for fields that params.yaml does not hold
    (derived or set by the code, e.g. ModelConfig.use_thoughts).
    """
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "speed": speed, "thoughts": thoughts,
            "in_params": in_params}  # fmt: skip
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is typing.Literal:
        return " | ".join(map(str, args))
    return {bool: "true or false", int: "an int", float: "a number", str: "a string", dict: "a mapping"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _fits(value, tp) -> bool:
    """Whether ``value`` has type ``tp`` as YAML gives it (bool is not an int; an int is a float)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        return any(_fits(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and (not args or all(_fits(v, args[0]) for v in value))
    if origin is typing.Literal:
        return value in args
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, tp)


def _expected_text(tp, meta: Mapping) -> str:
    """What a field takes: ``an int >= 1``, ``one of auto, cpu, cuda``, ``null or one of ...``."""
    if meta.get("choices") is not None:  # the choices name the type
        optional = type(None) in typing.get_args(tp)
        return ("null or " if optional else "") + "one of " + ", ".join(map(str, meta["choices"]))
    bounds = [f"{op} {meta[key]}" for key, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
              if meta.get(key) is not None]  # fmt: skip
    return " ".join(filter(None, [_type_name(tp), " and ".join(bounds)]))


def _in_range(value, meta: Mapping) -> bool:
    if value is None:
        return True
    if meta.get("choices") is not None and value not in meta["choices"]:
        return False
    items = value if isinstance(value, list) else [value]
    bounds = (("ge", lambda v, b: v >= b), ("gt", lambda v, b: v > b), ("le", lambda v, b: v <= b),
              ("lt", lambda v, b: v < b))
    return all(meta.get(k) is None or ok(v, meta[k]) for v in items for k, ok in bounds)


def check_fields(cfg, section: str) -> None:
    """Check every field of dataclass instance ``cfg`` against its annotation and :func:`param` range.

    Ints given for float fields become floats (params.yaml's ``lr: 1`` means 1.0).
    Raises ConfigError: ``section.key = value: expected TYPE RANGE``.
    """
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, tp = getattr(cfg, f.name), hints[f.name]
        if not _fits(value, tp) or not _in_range(value, f.metadata):
            raise ConfigError(f"{section}.{f.name} = {value!r}: expected {_expected_text(tp, f.metadata)}")
        if tp is float and isinstance(value, int):
            object.__setattr__(cfg, f.name, float(value))  # the configs are frozen


def dataclass_from_dict(cls, d: Mapping, section: str):
    """Build config ``cls`` from a params section; unknown keys (typos) and bad values are ConfigErrors."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{section} must be a mapping of keys to values, got {d!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown {section} config keys {unknown}; known: {sorted(known)}")
    try:
        return cls(**d)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:  # a cross-field check of __post_init__ (its message names the keys)
        raise ConfigError(str(err)) from None


def params_keys(cls) -> list[dataclasses.Field]:
    """The fields of config ``cls`` that params.yaml holds."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("in_params", True)]


class _ParamsLoader(yaml.SafeLoader):
    """YAML as DVC reads params.yaml (ruamel, YAML 1.2) for numbers with an exponent, and no repeated keys.

    YAML 1.1 (PyYAML) reads ``5e-4`` as a *string* (its floats need a dot), while DVC, and
    ``dvc exp run -S train.lr=5e-4``, take it for a number. A repeated key (a second
    ``train:`` section appended to the file) would silently replace the first, every key
    it lacks falling back to its default.
    """

    def construct_mapping(self, node, deep=False):
        lines: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may repeat keys it merges
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in lines:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (lines {lines[key]} and {key_node.start_mark.line + 1})")
            lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


# Appended after YAML 1.1's int and float patterns, so it only sees what they leave: numbers
# with an exponent that YAML 1.1 misses (no dot, or an unsigned exponent: 5e-4, 1.5e3).
_ParamsLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                    re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)[eE][-+]?[0-9]+$"),
                                    list("-+.0123456789"))


def parse_yaml(text: str) -> Any:
    """``text`` as params.yaml's values are read: see :class:`_ParamsLoader`."""
    return yaml.load(text, Loader=_ParamsLoader)


def load_params(path: str | Path, *sections: str) -> dict:
    """Load ``path`` and check that each of ``sections`` is present; returns the whole dict."""
    path = Path(path)
    try:
        params = parse_yaml(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"params file {path} not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"params file {path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(params, dict):
        raise ConfigError(f"params file {path} must hold a mapping of sections, got {type(params).__name__}")
    missing = [s for s in sections if not isinstance(params.get(s), dict)]
    if missing:
        raise ConfigError(f"params file {path} lacks section(s) {', '.join(missing)}")
    return params


def load_configs(path: str | Path, **classes) -> tuple[dict, types.SimpleNamespace]:
    """Read ``path`` and build one config per section: ``load_configs(p, train=TrainConfig)``.

    Returns (the whole params dict, a namespace of the configs by section name). Every
    section is checked before the caller does any work; errors are ConfigErrors naming
    the file and ``section.key``.
    """
    params = load_params(path, *classes)
    try:
        configs = {name: dataclass_from_dict(cls, params[name], name) for name, cls in classes.items()}
        check_seed_ranges(configs.values(), params)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return params, types.SimpleNamespace(**configs)


def check_seed_ranges(configs: Iterable, params: Mapping) -> None:
    """Levels of different roles (training, validation, test) must be different levels.

    Each config with a ``seed_ranges(params)`` names its ranges and their roles (``params``:
    the whole file, for a range set by another section's key); a test level that
    was a training level would measure recall, and one that chose the checkpoint (validation)
    would flatter it. Ranges of one role (the test sets of evaluate, ood, safety) may overlap.
    """
    roles = ("training", "validation", "test")  # the message names the later role's key first
    ranges = sorted(((key, *role_range) for cfg in configs if hasattr(cfg, "seed_ranges")
                     for key, role_range in cfg.seed_ranges(params).items()), key=lambda r: roles.index(r[1]))
    for i, (key_a, role_a, a) in enumerate(ranges):
        for key_b, role_b, b in ranges[i + 1 :]:
            if role_a != role_b and a.start < b.stop and b.start < a.stop:
                raise ConfigError(f"{key_b}: {role_b} seeds {b.start}..{b.stop - 1} overlap the {role_a} seeds "
                                  f"{a.start}..{a.stop - 1} ({key_a}); move one of them")


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys, as DVC names params (``train.lr``); lists stay whole."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


class Stopped(KeyboardInterrupt):
    """SIGTERM raised where the process was, as Ctrl-C raises KeyboardInterrupt (:func:`sigterm_unwinds`)."""

    signum = signal.SIGTERM


@contextlib.contextmanager
def _handling(signals: tuple[int, ...], handler: Any) -> Iterator[dict[int, Any]]:
    """``handler`` for ``signals`` while inside; yields the handlers it replaced. Signal handlers
    can only be set from the main thread: elsewhere nothing changes (and nothing is yielded)."""
    previous: dict[int, Any] = {}
    if threading.current_thread() is not threading.main_thread():
        yield previous
        return
    try:
        for s in signals:  # one by one inside the try: a signal between two is restored too
            previous[s] = signal.signal(s, handler)
        yield previous
    finally:
        for s, replaced in previous.items():
            signal.signal(s, replaced)


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Make SIGTERM raise :class:`Stopped` while inside, as Ctrl-C raises KeyboardInterrupt.

    Python's default SIGTERM handling exits without unwinding: a batch scheduler's preemption,
    ``kill`` or torchrun stopping its processes would leave an MLflow run RUNNING forever and
    worker processes behind. Unwinding runs the ``finally`` blocks and context managers on the
    way out. Only in the main thread; elsewhere nothing changes.
    """

    def stop(signum, _frame):
        raise Stopped(f"signal {signum}")

    with _handling((signal.SIGTERM,), stop):
        yield


STOPS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stops_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block is done, then raise them as they would have been:
    for a few lines that must not be cut in half (an optimizer step and its count). A block that
    raises keeps its own exception (the held stop is dropped: the process is ending anyway). Only
    in the main thread; elsewhere nothing changes."""
    caught: list[int] = []
    with _handling(STOPS, lambda signum, _frame: caught.append(signum)) as previous:
        yield
    if caught:
        handler = previous[caught[0]]
        if callable(handler):
            handler(caught[0], None)  # KeyboardInterrupt or Stopped
        elif handler == signal.SIG_DFL:
            signal.raise_signal(caught[0])


@contextlib.contextmanager
def stops_ignored() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM while inside: for what a stop does on its way out (saving a
    checkpoint), which a second Ctrl-C or a launcher's SIGTERM after a scheduler's would cut
    short. Only in the main thread; elsewhere nothing changes."""
    with _handling(STOPS, signal.SIG_IGN):
        yield


def quiet_worker() -> None:
    """In a worker process (a pool's initializer, a forked worker's first call): Ctrl-C ignored and
    SIGTERM at its default. The parent, which gets Ctrl-C too, stops its workers (SIGTERM) on
    its way out; a forked worker would otherwise inherit the parent's handlers and print a
    traceback of its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def ordered_map(fn: Callable, jobs: Iterable, workers: int, chunksize: int) -> Iterator[Iterator]:
    """``fn``'s results over ``jobs`` in the jobs' order, computed on ``workers`` processes (1: in
    this one). Forked: the workers need no re-import of the caller's ``__main__`` and never touch
    torch. They are stopped on the way out, so that after an error or a stop the queued jobs
    are not run first."""
    pool = mp.get_context("fork").Pool(workers, quiet_worker) if workers > 1 else None
    try:
        yield pool.imap(fn, jobs, chunksize=chunksize) if pool else map(fn, jobs)
    finally:
        if pool:
            pool.terminate()
            pool.join()


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a :class:`UserError` or a missing file into ``error: <message>`` on stderr and exit
    status 1, without a traceback.

    Stages and the ``tc`` command run their work inside it; any other exception is a bug
    and keeps its traceback. A stop by Ctrl-C or SIGTERM is one line too, ``stopped by
    SIGINT`` with the notes added on the way out (``add_note``: where a training run
    resumes), and then the process ends by that signal as if it had not caught it: a shell
    loop over stages stops, a launcher sees the signal.
    """
    with sigterm_unwinds():
        try:
            yield
        except (UserError, FileNotFoundError) as err:
            # One write, newline included (print makes two): the processes of a data-parallel run
            # share stderr, and two of them failing alike would otherwise interleave their lines.
            sys.stderr.write(f"error: {err}\n")
            raise SystemExit(1) from None
        except KeyboardInterrupt as err:
            end_by_signal(getattr(err, "signum", signal.SIGINT), getattr(err, "__notes__", []))


def end_by_signal(signum: int, notes: list[str]) -> None:
    """Say in one line that ``signum`` stopped the process, then end the process by it."""
    for s in STOPS:  # a second stop now would end in a traceback
        signal.signal(s, signal.SIG_IGN)
    # torchrun's processes: the launcher says what stopped them, passing its signal on, or
    # SIGTERM when one of them failed. The first one adds what it saved (where training resumes);
    # without a note (stopped while starting), it leaves the launcher's line alone.
    torchrun = "LOCAL_RANK" in os.environ
    if int(os.environ.get("RANK", "0")) == 0 and (notes or not torchrun):
        # A new line first: a progress bar may be half-way through its line.
        sys.stderr.write(f"\nstopped by {signal.Signals(signum).name}{''.join(f'; {n}' for n in notes)}\n")
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    raise SystemExit(128 + signum)  # where the signal is not delivered at once
