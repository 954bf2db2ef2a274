"""DVC stage `make_ood_levels`: seeds of demos.level (paper: BossLevel) binned by behavioural and cognitive difficulty.

    python stages/make_ood_levels.py --params params.yaml --out data/ood/levels.json

Definitions in tc/ood.py. Bins that could not be filled within ood.max_candidates seeds
are listed under "unfilled" in the JSON and printed here. Stopped, the stage keeps the seeds
it has scanned beside --out (tc/journal.py) and the same command goes on from them.
"""

from __future__ import annotations

import argparse

from tc.demos import DemosConfig
from tc.io import check_output, write_json_atomic
from tc.journal import Journal
from tc.ood import OodConfig, kept_measure, make_level_sets
from tc.params import load_configs, user_errors


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="reads ood.* and demos.level")
    parser.add_argument("--out", default="data/ood/levels.json")
    args = parser.parse_args(argv)

    with user_errors():
        _, c = load_configs(args.params, ood=OodConfig, demos=DemosConfig)
        check_output(args.out, "--out")
        o = c.ood
        # A seed's measure depends on its level alone; with ood.seed, what is said to be kept is this scan's.
        with Journal(args.out, __file__, {}, kept_measure, level=c.demos.level, ood={"seed": o.seed}) as journal:
            sets = make_level_sets(c.demos.level, o.seed, o.episodes_per_bin, o.max_candidates, o.behavioural_bins,
                                   o.cognitive_levels, workers=o.workers, journal=journal)  # fmt: skip
            write_json_atomic(args.out, sets)
    print(f"scanned {sets['candidates_scanned']} seeds; bot failures: {len(sets['bot_failures'])}")
    for axis, bins in sets["unfilled"].items():
        for b, n in bins.items():
            print(f"WARNING: {axis} bin {b} has only {n} of {o.episodes_per_bin} seeds")


if __name__ == "__main__":
    main()
