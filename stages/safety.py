"""DVC stage `safety`: precrime intervention and the Future Action Declaration Score.

    python stages/safety.py --params params.yaml --tc models/tc/best.pt --out reports/metrics/safety.json

For every behaviour of safety.behaviours (validated by tc.safety.parse_behaviours), TC runs
on seeds safety.seed .. + safety.episodes without and with the intervention. safety.json
(numbers only; the definitions stay in params.yaml): one entry per behaviour (share of
episodes showing it and success rate, without -> with),
"no_intervention" (the shared run without intervention) and "fads" (in distribution; the
OOD scores are in ood.json, per bin).
"""

from __future__ import annotations

import argparse

from tc import tracking
from tc.demos import DemosConfig
from tc.evaluate import EvaluateConfig
from tc.io import check_output, write_json_atomic
from tc.journal import Journal
from tc.params import load_configs, user_errors
from tc.safety import SafetyConfig, run_precrime


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="reads safety.*, evaluate.* and demos.level")
    parser.add_argument("--tc", default="models/tc/best.pt")
    parser.add_argument("--out", default="reports/metrics/safety.json")
    args = parser.parse_args(argv)

    with user_errors():
        params, c = load_configs(args.params, evaluate=EvaluateConfig, demos=DemosConfig, safety=SafetyConfig)
        check_output(args.out, "--out")
        agent = c.evaluate.load_agent(args.tc, "tc")
        seeds = list(range(c.safety.seed, c.safety.seed + c.safety.episodes))

        # The behaviours by name: a part "with <name>" is kept for the definition it had.
        journal = Journal(args.out, __file__, {"--tc": args.tc}, level=c.demos.level, behaviours=c.safety.behaviours,
                          evaluate=c.evaluate.outcome_settings(next(agent.parameters()).device))  # fmt: skip
        with tracking.start_run("safety", params, tags={"stage": "safety"}), journal:
            behaviours = c.safety.parsed_behaviours()
            res = run_precrime(agent, c.demos.level, seeds, behaviours, journal=journal, **c.evaluate.kwargs())
            report = {**res["behaviours"], "no_intervention": res["without"],
                      "fads": {**res["fads"], "episodes": len(seeds)}}  # fmt: skip
            for b in behaviours:
                row = res["behaviours"][b.name]
                tracking.log_metrics({f"{b.name}_{k}": v for k, v in row.items()})
                print(f"{b.name}: shown {row['shown_without']:.3f} -> {row['shown_with']:.3f}, "
                      f"success {row['success_without']:.3f} -> {row['success_with']:.3f}")  # fmt: skip
                if row["halted_with"] == 0:  # a run halts at the first match: none in any episode
                    print(f"  note: no thought of the agent matched {b.thought.pattern!r} in {len(seeds)} episodes: "
                          f"the intervention never fired")  # fmt: skip
            tracking.log_metrics({"fads": res["fads"]["score"]})
            write_json_atomic(args.out, report)


if __name__ == "__main__":
    main()
