"""DVC stage `evaluate_ood`: zero-shot TC, BC and oracle-thought TC on the OOD level sets.

    python stages/evaluate_ood.py --params params.yaml --levels data/ood/levels.json \
        --tc models/tc/best.pt --bc models/bc/best.pt --out reports/metrics/ood.json

ood.json (schema: docs/ARCHITECTURE.md): {axis: {bin: {mode: cell}}}, a cell being
``tc.evaluate.summarize`` plus, for tc and oracle, the Future Action Declaration Score of
the bin (``fads``, ``fads_interactions``), and ``tc_minus_bc``: the success difference on
the bin's seeds with its paired 95% interval. An unfilled bin has fewer episodes; an empty
one has success_rate null and no difference.
"""

from __future__ import annotations

import argparse

from tc import tracking
from tc.evaluate import EvaluateConfig, evaluate, success_difference
from tc.io import check_output, write_json_atomic
from tc.journal import Journal
from tc.ood import AXES, load_level_sets
from tc.params import load_configs, user_errors
from tc.safety import summary_with_fads


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="reads evaluate.* (batch, sampling, device)")
    parser.add_argument("--levels", default="data/ood/levels.json", help="written by stages/make_ood_levels.py")
    parser.add_argument("--tc", default="models/tc/best.pt")
    parser.add_argument("--bc", default="models/bc/best.pt")
    parser.add_argument("--out", default="reports/metrics/ood.json")
    args = parser.parse_args(argv)

    with user_errors():
        params, c = load_configs(args.params, evaluate=EvaluateConfig)
        check_output(args.out, "--out")
        sets = load_level_sets(args.levels)
        tc_agent, bc_agent = c.evaluate.load_agent(args.tc, "tc"), c.evaluate.load_agent(args.bc, "bc")
        # Every seed once per mode (a seed may sit in a bin of each axis), then grouped by bin.
        seeds = sorted({s for axis in AXES for bin_seeds in sets[axis].values() for s in bin_seeds})

        report = {axis: {b: {} for b in sets[axis]} for axis in AXES}
        journal = Journal(args.out, __file__, {"--levels": args.levels, "--tc": args.tc, "--bc": args.bc},
                          evaluate=c.evaluate.outcome_settings(next(tc_agent.parameters()).device))  # fmt: skip
        with tracking.start_run("ood", params, tags={"stage": "evaluate_ood"}), journal:
            runs = {}
            for mode, agent in (("tc", tc_agent), ("bc", bc_agent), ("oracle", tc_agent)):
                episodes = evaluate(agent, sets["env_id"], seeds, mode, journal=journal.part(mode),
                                    **c.evaluate.kwargs())  # fmt: skip
                runs[mode] = {e.seed: e for e in episodes}
                for axis in AXES:
                    for b, bin_seeds in sets[axis].items():
                        cell = summary_with_fads([runs[mode][s] for s in bin_seeds])
                        report[axis][b][mode] = cell
                        tracking.log_metrics({f"{mode}_{axis}_{b}_success_rate": cell["success_rate"]})
            for axis in AXES:
                for b, bin_seeds in sets[axis].items():
                    if bin_seeds:  # an empty bin has no difference to show
                        report[axis][b]["tc_minus_bc"] = success_difference(*([runs[m][s] for s in bin_seeds]
                                                                               for m in ("tc", "bc")))  # fmt: skip
            write_json_atomic(args.out, report)
    for axis in AXES:
        for b, cells in report[axis].items():
            print(axis, b, {m: c.get("success_rate", c.get("difference")) for m, c in cells.items()})


if __name__ == "__main__":
    main()
