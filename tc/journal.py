"""Results kept as a stage finishes them, so that a stopped stage goes on from them.

At paper size the evaluation stages run for long (BossLevel's failing episodes last up to
~2,900 steps; four modes; the OOD bins), and so does the OOD scan (up to 200,000 of the
bot's episodes), and a Ctrl-C, a scheduler's preemption or a crash would otherwise throw
all of it away. Each finished episode is appended as one JSON line to a hidden file beside
the stage's output (``reports/metrics/.eval.json.episodes``), whose first line records the
inputs: the code's digest, the input files' SHA-256, the settings that change results, the
device among them (float rounding), and the versions of minigrid, gymnasium, numpy and
torch loaded. Run again on the same inputs, the stage plays only the seeds it has not kept.
An episode's result depends on its seed alone (tc.evaluate: one sampling stream per
episode, rows that do not interact; tc.ood: the bot on a fresh reset), so the output is
the one an uninterrupted run writes (tests). On other inputs the file is dropped, with a
line saying which input changed. It is removed once the output is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path

from tc.episodes import Interaction, Rollout
from tc.io import write_text_atomic
from tc.params import flatten, stops_deferred
from tc.provenance import code_digest


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


LIBRARIES = ("minigrid", "gymnasium", "numpy", "torch")


class Journal:
    """The kept episodes of the stage writing ``output``; a context manager around the stage's work.

    ``files``: the input files the results depend on, by the flag that names them
    (``{"--tc": "models/tc/best.pt"}``; compared by content); ``settings``: the settings
    they depend on (``{"level": ..., "evaluate": EvaluateConfig.outcome_settings(...)}``, as
    JSON holds them), to which the versions of the libraries loaded that an episode depends
    on are added; ``script``: the stage's file (its code digest, tc.provenance). ``decode``
    turns a kept record into what :meth:`add` was given with it (an evaluation's Rollout: the
    default), raising on a record it cannot read. Leaving the block normally removes the file
    (the output is written by then); leaving it by an exception adds a note saying what is
    kept (tc.params.user_errors prints a stop's).
    """

    def __init__(self, output: str | Path, script: str | Path, files: dict[str, str | Path],
                 decode: Callable[[dict], object] | None = None, **settings):  # fmt: skip
        output = Path(output)
        self.path = output.parent / f".{output.name}.episodes"
        self.paths = {flag: str(p) for flag, p in files.items()}  # for messages: a file is its content
        # The levels' dynamics, their seeding, the sampling streams and float kernels come from these.
        versions = {name: sys.modules[name].__version__ for name in LIBRARIES if name in sys.modules}
        self.inputs = {"code": code_digest(script), "files": {flag: file_digest(p) for flag, p in files.items()},
                       "settings": json.loads(json.dumps(flatten(settings | {"versions": versions})))}  # fmt: skip
        self.decode = decode or _rollout
        self.kept: dict[str, dict[int, object]] = {}  # part -> seed -> what was kept (decoded)
        self._file = None

    def __enter__(self) -> Journal:
        lines = self.path.read_text().split("\n") if self.path.is_file() else [""]
        # A last line without its newline was cut short (the process died writing it): dropped.
        try:
            head = json.loads(lines[0]) if len(lines) > 1 else None
            readable = isinstance(head, dict) and head.keys() == self.inputs.keys()
            if head is not None and not (readable and all(isinstance(head[k], dict) for k in ("files", "settings"))):
                raise ValueError("its first line is not a journal's inputs")
            kept_lines = {}  # (part, seed) -> its last line: a rewrite keeps one line per episode
            if head == self.inputs:
                for line in lines[1:-1]:
                    record = json.loads(line)
                    part = record.pop("part")
                    self.kept.setdefault(part, {})[record["seed"]] = self.decode(record)
                    kept_lines[part, record["seed"]] = line
        except (ValueError, TypeError, KeyError, AttributeError) as err:  # not a journal's lines
            print(f"starting afresh: {self.path} could not be read ({err})")
            head, self.kept, kept_lines = None, {}, {}
        if head is not None and head != self.inputs:
            print(f"starting afresh: {self.path} was kept for other inputs ({self.changed(head)})")
        elif self.kept:
            print(f"going on from the {self.count()} episodes kept in {self.path}")
        if head != self.inputs or lines[-1]:  # the file anew: a cut last line or other inputs dropped
            write_text_atomic(self.path, "".join(f"{line}\n" for line in [json.dumps(self.inputs), *kept_lines.values()]))
        self._file = open(self.path, "a")
        return self

    def changed(self, old: dict) -> str:
        """Which inputs differ from ``old`` (a journal's first line), in words."""
        new = self.inputs
        what = [f"{flag} {self.paths[flag]}" for flag in new["files"] if old["files"].get(flag) != new["files"][flag]]
        settings = list(new["settings"]) + [k for k in old["settings"] if k not in new["settings"]]
        what += [k for k in settings if old["settings"].get(k, object()) != new["settings"].get(k, object())]
        if old["code"] != new["code"]:
            what.append("the code")
        return ", ".join(what) + " changed" if what else "another format"

    def count(self) -> int:
        return sum(len(episodes) for episodes in self.kept.values())

    def part(self, name: str) -> Part:
        """The episodes of one evaluation of the stage (a mode, a behaviour's intervention)."""
        return Part(self, name)

    def add(self, part: str, record: dict, value: object) -> None:
        """Keep ``record`` (JSON-able, with its episode's ``"seed"``; ``decode`` gives ``value``) under ``part``."""
        with stops_deferred():  # the line whole or not at all, and counted once written (a stop's note)
            self._file.write(json.dumps({"part": part, **record}) + "\n")
            self._file.flush()
            self.kept.setdefault(part, {})[record["seed"]] = value

    def __exit__(self, kind, err, _tb) -> None:
        self._file.close()
        if kind is None:
            self.path.unlink(missing_ok=True)
        elif self.count():  # a stop (tc.params.user_errors says the note) or a crash (its traceback does)
            err.add_note(f"{self.count()} episodes are kept in {self.path}; the same command goes on from them")


@dataclasses.dataclass(frozen=True)
class Part:
    """One evaluation's share of a :class:`Journal`: what :func:`tc.evaluate.evaluate` keeps and reuses."""

    journal: Journal
    name: str

    def kept(self) -> dict[int, Rollout]:
        return self.journal.kept.get(self.name, {})

    def add(self, episode: Rollout) -> None:
        record = dataclasses.asdict(episode)
        del record["frames"]  # empty: tc.evaluate refuses to render into a journal
        # A thought stays in force for several steps, and a failing BossLevel episode lasts up to ~2,900:
        # as runs of [thought, steps] a line is 2-4x shorter for the bot's BossLevel episodes, 2-30x for
        # an untrained agent's 1,000-step ones (~100 kB before).
        record["thoughts"] = [[t, len(list(steps))] for t, steps in itertools.groupby(episode.thoughts)]
        self.journal.add(self.name, record, episode)


def _rollout(record: dict) -> Rollout:
    interactions = [Interaction(**i) for i in record["interactions"]]
    thoughts = [t for t, n in record["thoughts"] for _ in range(n)]
    return Rollout(**record | {"interactions": interactions, "thoughts": thoughts})
