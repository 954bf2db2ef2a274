"""DVC stage `plots`: the paper's figures (Fig. 3, Fig. 4(a), training curves) as PNGs.

    python stages/plots.py --params params.yaml --history tc=reports/plots/train_tc.csv \
        --history bc=reports/plots/train_bc.csv --ood reports/metrics/ood.json --out reports/figures
"""

from __future__ import annotations

import argparse

from tc.io import check_output
from tc.params import load_configs, user_errors
from tc.plots import PlotsConfig, write_figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="reads its `plots` section")
    parser.add_argument("--history", action="append", default=[], metavar="AGENT=CSV",
                        help="training history of an agent (repeatable); a missing file is noted on the figure")
    parser.add_argument("--ood", default="reports/metrics/ood.json", help="out-of-distribution results (optional)")
    parser.add_argument("--out", default="reports/figures", help="folder for the PNG files")
    args = parser.parse_args(argv)

    histories = {}
    for item in args.history:
        agent, sep, path = item.partition("=")
        if not sep or not agent or not path:
            parser.error(f"--history {item!r}: expected AGENT=CSV, e.g. tc=reports/plots/train_tc.csv")
        if agent in histories:
            parser.error(f"--history {agent}= given twice ({histories[agent]}, {path}); one history per agent")
        histories[agent] = path

    with user_errors():  # bad params, a malformed history CSV or ood.json: one line
        _, c = load_configs(args.params, plots=PlotsConfig)
        check_output(args.out, "--out", folder=True)
        paths = write_figures(histories, args.ood, args.out, dpi=c.plots.dpi)
    for name, path in paths.items():
        print(f"{name}: {path}")

if __name__ == "__main__":
    main()
