"""DVC stage `report`: reports/summary.md, the results in tables next to the paper's numbers.

    python stages/report.py --params params.yaml --metrics reports/metrics --plots reports/plots \
        --out reports/summary.md
"""

from __future__ import annotations

import argparse

from tc.io import check_output, write_text_atomic
from tc.params import load_params, user_errors
from tc.report import build_report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="the run's config, shown next to the paper's")
    parser.add_argument("--metrics", default="reports/metrics", help="folder of train_*.json, eval/ood/safety.json")
    parser.add_argument("--plots", default="reports/plots", help="folder of the train_*.csv histories")
    parser.add_argument("--out", default="reports/summary.md")
    args = parser.parse_args(argv)

    # No section is required: the report notes what a config lacks.
    with user_errors():  # a malformed history CSV or ood.json: one line
        check_output(args.out, "--out")
        write_text_atomic(args.out, build_report(load_params(args.params), args.metrics, args.plots))
    print(f"report: {args.out}")


if __name__ == "__main__":
    main()
