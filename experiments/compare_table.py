"""The README's exploration table from experiments/compare.py results.

    python experiments/compare_table.py reports/explore/*.json

One row per compare.json: the config (its --set overrides), frames per agent, test success
of TC, BC, TC without imitating thoughts and TC on the bot's thoughts (oracle), each with
its Wilson 95% interval, and the paired differences TC - BC and TC - TC w/o thoughts. Runs
that differ only in train.seed are also summarised over the seeds (mean and t interval).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tc.params import UserError, user_errors
from tc.report import difference, rate
from tc.stats import over_runs


def cell(r: dict | None) -> str:
    return "-" if r is None else rate(r["success_rate"], r["success_ci_low"], r["success_ci_high"])


def load(path: Path) -> dict:
    """A compare.json (experiments/compare.py's output), or a UserError naming the file."""
    try:
        c = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(c, dict) or "tc" not in c.get("agents", {}):
        raise UserError(f"{path}: not a compare.json of experiments/compare.py with a TC agent")
    return c


def row(path: Path, c: dict) -> str:
    a = c["agents"]
    setting = ", ".join(o.replace("demos.level=BabyAI-", "").replace("-v0", "") for o in c["overrides"])
    frames = a["tc"].get("frames", "-")
    cells = [path.stem, setting, f"{frames:,}" if isinstance(frames, int) else frames, str(a["tc"]["episodes"]),
             cell(a.get("tc")), cell(a.get("bc")), cell(a.get("tc_no_thoughts")), cell(a["tc"].get("oracle")),
             difference(c.get("tc_minus_bc")), difference(c.get("tc_minus_tc_no_thoughts"))]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def seed_groups(results: list[dict]) -> dict[str, list[dict]]:
    """compare.json results grouped by their overrides apart from train.seed (groups of 2 or more)."""
    groups: dict[str, list[dict]] = {}
    for c in results:
        key = ", ".join(o for o in c["overrides"] if not o.startswith("train.seed="))
        groups.setdefault(key, []).append(c)
    return {k: v for k, v in groups.items() if len(v) > 1}


def over_seeds_row(setting: str, runs: list[dict]) -> str:
    """Means over training seeds with 95% t intervals (tc.stats.over_runs), in points."""

    def fmt(values: list[float], signed: bool = False) -> str:
        r = over_runs(values)
        sign = "+" if signed else ""
        return (f"{100 * r['mean']:{sign}.1f} [{100 * r['ci_low']:{sign}.1f}, {100 * r['ci_high']:{sign}.1f}] "
                f"(runs: {', '.join(f'{100 * v:{sign}.1f}' for v in values)})")  # fmt: skip

    rate = lambda agent: fmt([c["agents"][agent]["success_rate"] for c in runs])  # noqa: E731
    diff = fmt([c["tc_minus_bc"]["difference"] for c in runs], signed=True)
    return f"| {setting.replace('demos.level=BabyAI-', '').replace('-v0', '')} | {len(runs)} | {rate('tc')} | {rate('bc')} | {diff} |"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", type=Path, help="compare.json files")
    args = ap.parse_args(argv)
    with user_errors():
        results = [load(path) for path in args.results]
    print("| run | config (over params.yaml) | frames | test episodes | TC % [95% CI] | BC % | TC w/o thoughts % "
          "| TC, oracle thoughts % | TC - BC (points, paired) | TC - TC w/o thoughts |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path, c in zip(args.results, results):
        print(row(path, c))
    groups = seed_groups(results)
    if groups:
        print("\nOver training seeds (mean, 95% t interval over runs, the runs):\n")
        print("| config | training seeds | TC % | BC % | TC - BC (points) |")
        print("|---|---|---|---|---|")
        for setting, runs in groups.items():
            print(over_seeds_row(setting, runs))


if __name__ == "__main__":
    main()
