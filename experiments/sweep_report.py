"""Aggregate a seed sweep of DVC experiments into reports/sweep.md and reports/sweep.json.

    dvc exp run --queue -S 'train.seed=1,2,3'     # three queued experiments, one per seed
    dvc exp run --run-all -j 1
    python experiments/sweep_report.py            # reads `dvc exp show --json`

Experiments equal in every results-changing setting but the swept ones (--over, default
train.seed) form a group; each metric gets its mean, spread and 95% interval over the
group's runs (tc.sweep). --exp-json reads a saved `dvc exp show --json` instead of running it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

from tc.io import write_json_atomic, write_text_atomic
from tc.params import UserError, user_errors
from tc.sweep import DEFAULT_METRICS, aggregate, experiment_records, sweep_markdown


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exp-json", type=Path, help="a saved `dvc exp show --json` (default: run it here)")
    ap.add_argument("--over", default="train.seed", help="comma-separated swept params (default train.seed)")
    ap.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help="comma-separated metric names")
    ap.add_argument("--out", type=Path, default=Path("reports/sweep.md"), help="markdown; the JSON goes beside it")
    args = ap.parse_args(argv)
    with user_errors():
        if args.exp_json:
            text = args.exp_json.read_text()
        else:
            if shutil.which("dvc") is None:
                raise UserError("dvc is not on PATH: run this with the project's .venv/bin first on PATH, or pass "
                                "--exp-json FILE (a saved `dvc exp show --json`)")
            shown = subprocess.run(["dvc", "exp", "show", "--json"], capture_output=True, text=True)
            if shown.returncode:
                raise UserError(f"`dvc exp show --json` failed: {shown.stderr.strip().splitlines()[-1:]}")
            text = shown.stdout
        try:
            records = experiment_records(json.loads(text))
        except json.JSONDecodeError as err:
            raise UserError(f"{args.exp_json or 'dvc exp show --json'}: not valid JSON ({err})") from None
        if not records:
            raise UserError("no experiment with metrics found: run the sweep first (see --help)")
        groups = aggregate(records, tuple(args.over.split(",")), tuple(args.metrics.split(",")))
        write_json_atomic(args.out.with_suffix(".json"), groups)
        write_text_atomic(args.out, sweep_markdown(groups))
    for g in groups:
        print(g["setting"] or "workspace params", f"{len(g['runs'])} runs",
              {m: round(s["mean"], 3) for m, s in g["metrics"].items()})


if __name__ == "__main__":
    main()
