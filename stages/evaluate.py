"""DVC stage `evaluate`: TC, BC, TC with oracle thoughts and the bot on fresh test seeds.

    python stages/evaluate.py --params params.yaml --tc models/tc/best.pt --bc models/bc/best.pt \
        --out reports/metrics/eval.json

Seeds evaluate.seed .. evaluate.seed + evaluate.episodes - 1 of demos.level. eval.json has
one entry per mode: ``tc.evaluate.summarize`` fields, plus the Future Action Declaration
Score (``fads``) for the modes that think. The bot's row is the expert reference.
``tc_minus_bc`` and ``oracle_minus_tc`` are success differences on the same seeds, with
their paired 95% intervals (tc.stats.paired_difference).
"""

from __future__ import annotations

import argparse

from tc import tracking
from tc.demos import DemosConfig
from tc.evaluate import EvaluateConfig, evaluate, success_difference
from tc.io import check_output, write_json_atomic
from tc.journal import Journal
from tc.params import load_configs, user_errors
from tc.safety import summary_with_fads

# (a, b): success of a minus that of b, paired by seed. Does thinking beat acting alone; what
# would better thoughts give.
DIFFERENCES = (("tc", "bc"), ("oracle", "tc"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="reads evaluate.* and demos.level")
    parser.add_argument("--tc", default="models/tc/best.pt", help="Thought Cloning checkpoint")
    parser.add_argument("--bc", default="models/bc/best.pt", help="Behavioural Cloning checkpoint")
    parser.add_argument("--out", default="reports/metrics/eval.json")
    args = parser.parse_args(argv)

    with user_errors():
        params, c = load_configs(args.params, evaluate=EvaluateConfig, demos=DemosConfig)
        check_output(args.out, "--out")
        seeds = list(range(c.evaluate.seed, c.evaluate.seed + c.evaluate.episodes))
        tc_agent, bc_agent = c.evaluate.load_agent(args.tc, "tc"), c.evaluate.load_agent(args.bc, "bc")
        device = next(tc_agent.parameters()).device
        journal = Journal(args.out, __file__, {"--tc": args.tc, "--bc": args.bc},
                          evaluate=c.evaluate.outcome_settings(device), level=c.demos.level)  # fmt: skip
        with tracking.start_run("evaluate", params, tags={"stage": "evaluate"}), journal:
            report, runs = {}, {}
            for mode, agent in (("tc", tc_agent), ("bc", bc_agent), ("oracle", tc_agent), ("bot", None)):
                runs[mode] = evaluate(agent, c.demos.level, seeds, mode, journal=journal.part(mode),
                                      **c.evaluate.kwargs())  # fmt: skip
                report[mode] = summary_with_fads(runs[mode])
                tracking.log_metrics({f"{mode}_{k}": v for k, v in report[mode].items()})
                print(f"{mode}: {report[mode]}")
            for a, b in DIFFERENCES:
                report[f"{a}_minus_{b}"] = success_difference(runs[a], runs[b])
                tracking.log_metrics({f"{a}_minus_{b}_{k}": v for k, v in report[f"{a}_minus_{b}"].items()})
                print(f"{a} - {b}: {report[f'{a}_minus_{b}']}")
            write_json_atomic(args.out, report)


if __name__ == "__main__":
    main()
