"""Aggregate DVC experiments that differ only in a swept setting (by default ``train.seed``).

A seed sweep is a DVC experiment queue (README "Seeds"); this reads the experiments from
``dvc exp show --json``, groups those whose results-changing params are equal apart from
the swept keys, and gives each metric of a group its mean, spread and 95% t interval over
the runs (tc.stats.over_runs): what varies with the training seed, which one
evaluation's episode interval does not show.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tc.demos import DemosConfig
from tc.evaluate import EvaluateConfig
from tc.model import ModelConfig
from tc.ood import OodConfig
from tc.params import FileFormatError, flatten
from tc.stats import over_runs
from tc.train import TrainConfig

# The metrics summarised by default: test success of each mode, the paired differences, the
# best validation success of each agent (metric file stem + "." + key).
DEFAULT_METRICS = ("eval.tc.success_rate", "eval.bc.success_rate", "eval.oracle.success_rate",
                   "eval.tc_minus_bc.difference", "eval.oracle_minus_tc.difference",
                   "train_tc.best_val_success", "train_bc.best_val_success")  # fmt: skip
SECTIONS = {"demos": DemosConfig, "model": ModelConfig, "train": TrainConfig, "evaluate": EvaluateConfig,
            "ood": OodConfig}  # fmt: skip
# Settings that change only how fast results come (tc.params.param(speed=True)): runs that
# differ in them alone belong to one group.
SPEED_KEYS = {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls) if f.metadata["speed"]}


def experiment_records(exp_show: list) -> list[dict]:
    """``[{"name", "params", "metrics"}]`` (flat dotted keys; metrics prefixed by their file's stem)
    of every experiment with metrics in a ``dvc exp show --json`` document. Queued or failed
    experiments (no metrics) are left out; the workspace or a commit holding the same results
    as an experiment counts once."""
    if not isinstance(exp_show, list):
        raise FileFormatError("expected the list that `dvc exp show --json` prints")
    records, seen = [], set()

    def add(name: str, data: dict | None) -> None:
        # a file DVC could not read (not produced yet) is {"error": ...} instead of {"data": ...}
        metrics = {k: v for path, f in ((data or {}).get("metrics") or {}).items()
                   for k, v in flatten(f.get("data") or {}, Path(path).stem + ".").items()}  # fmt: skip
        if not metrics:
            return
        params = {k: v for f in (data.get("params") or {}).values() for k, v in flatten(f.get("data") or {}).items()}
        key = json.dumps([params, metrics], sort_keys=True)
        if key not in seen:
            seen.add(key)
            records.append({"name": name, "params": params, "metrics": metrics})

    for entry in exp_show:
        for exp in entry.get("experiments") or []:  # named experiments first: they keep their names
            for rev in exp.get("revs") or []:
                add(rev.get("name") or exp.get("name") or rev.get("rev"), rev.get("data"))
    for entry in exp_show:
        add(entry.get("name") or entry.get("rev"), entry.get("data"))
    return records


def aggregate(records: list[dict], over: tuple[str, ...] = ("train.seed",),
              metrics: tuple[str, ...] = DEFAULT_METRICS) -> list[dict]:  # fmt: skip
    """Groups of records equal in every param but ``over`` and the speed settings.

    Each group: ``setting`` (the params that tell the groups apart), ``runs`` (names and
    swept values) and, per metric present in every run, :func:`tc.stats.over_runs`.
    """
    ignored = set(over) | SPEED_KEYS
    groups: dict[str, list[dict]] = {}
    for r in records:
        key = json.dumps({k: v for k, v in r["params"].items() if k not in ignored}, sort_keys=True)
        groups.setdefault(key, []).append(r)
    settings = [json.loads(k) for k in groups]
    differing = sorted({k for s in settings for k in s if any(o.get(k) != s[k] for o in settings)})
    out = []
    for setting, members in zip(settings, groups.values()):
        stats = {m: over_runs([r["metrics"][m] for r in members]) for m in metrics
                 if all(isinstance(r["metrics"].get(m), (int, float)) for r in members)}  # fmt: skip
        runs = [{"name": r["name"], **{k: r["params"].get(k) for k in over}} for r in members]
        out.append({"setting": {k: setting.get(k) for k in differing}, "runs": runs, "metrics": stats})
    return out


def sweep_markdown(groups: list[dict]) -> str:
    """The groups as markdown: one table per group, a row per metric (in %)."""
    lines = ["# Seed sweep", "",
             "Mean over runs, sample standard deviation, range and 95% t interval of the mean (over runs, "
             "not episodes). A difference whose interval holds 0 is no difference.", ""]  # fmt: skip
    for g in groups:
        setting = ", ".join(f"{k}={v}" for k, v in g["setting"].items()) or "the workspace's params"
        names = ", ".join(f"{r['name']} ({', '.join(f'{k}={v}' for k, v in r.items() if k != 'name')})"
                          for r in g["runs"])  # fmt: skip
        lines += [f"## {setting}", "", f"{len(g['runs'])} runs: {names}", "",
                  "| metric | mean % | std | min | max | 95% CI of the mean |", "|---|---|---|---|---|---|"]
        for m, s in g["metrics"].items():
            pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
            ci = "-" if s["ci_low"] is None else f"[{pct(s['ci_low'])}, {pct(s['ci_high'])}]"
            lines.append(f"| {m} | {pct(s['mean'])} | {pct(s['std'])} | {pct(s['min'])} | {pct(s['max'])} | {ci} |")
        lines.append("")
    return "\n".join(lines)
