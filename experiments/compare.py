"""Train TC, BC and TC without imitating thoughts on one config and compare them on the same test seeds.

    python experiments/compare.py --out /tmp/cmp/mini --set demos.level=BabyAI-MiniBossLevel-v0 \
        --set train.epochs=6 --episodes 200

The exploration behind the README's "Does TC beat BC at this scale?" table: for each
config it runs the pipeline's own stages (generate_demos, train) in <out>, with
params.yaml plus the --set overrides, then evaluates each agent on the test seeds
evaluate.seed .. + episodes - 1 (its own mode: tc, bc, and tc for the sg_coef 0 agent; the
TC agent also with the bot's thoughts, "oracle")
and writes <out>/compare.json: each agent's success with its Wilson 95% interval, the
per-seed outcomes, and the paired differences TC - BC and TC - TC w/o thoughts with their
Newcombe intervals (tc.stats). Two jobs run at a time (one torch thread each). An agent
whose training finished in <out> before is evaluated again, not retrained.
MLflow runs go to <out>/mlflow_<agent>.db, not the project's (one file per agent: two
processes creating one SQLite store at once race on its schema).
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import torch
import yaml

from tc.demos import DemosConfig
from tc.evaluate import EvaluateConfig, evaluate, load_agent_for, summarize
from tc.io import write_json_atomic
from tc.model import ModelConfig
from tc.params import UserError, dataclass_from_dict, load_configs, load_params, parse_yaml, user_errors
from tc.stats import paired_difference
from tc.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
AGENTS = {"tc": ("tc", []), "bc": ("bc", []), "tc_no_thoughts": ("tc", ["train.sg_coef=0"])}


def override(params: dict, assignments: list[str]) -> dict:
    """params with each ``section.key=value`` applied (value parsed as YAML)."""
    for item in assignments:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in params or name not in params[section]:
            raise UserError(f"--set {item}: expected section.key=value with a key of params.yaml")
        params[section][name] = parse_yaml(value)
    return params


def stage(*args: str, env: dict) -> None:
    """Run a stage; its own error line is on stderr already, so a failure is one more line, no traceback."""
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    if done.returncode:
        raise UserError(f"{args[0]} {' '.join(args[1:3])} failed (exit status {done.returncode}; its error is above)")


def train_and_evaluate(name: str, out: Path, params: dict, seeds: list[int], env: dict) -> dict:
    """Train agent ``name`` (AGENTS) with the stage, then evaluate its best checkpoint on ``seeds``."""
    mode, extra = AGENTS[name]
    path = out / f"params_{name}.yaml"
    path.write_text(yaml.safe_dump(override(copy.deepcopy(params), extra)))
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{out.resolve() / f'mlflow_{name}.db'}"}
    torch.set_num_threads(1)  # two jobs share the machine's cores; more threads each would oversubscribe them
    start = time.time()
    metrics = out / f"train_{name}.json"  # written when training has finished: then only evaluate again
    if not metrics.exists():
        stage("stages/train.py", "--params", str(path), "--agent", mode, "--train", str(out / "demos/train"),
              "--val", str(out / "demos/val"), "--out", str(out / "models" / name), "--metrics", str(metrics),
              "--history", str(out / f"train_{name}.csv"), "--no-resume", env=env)  # fmt: skip
    train_s = time.time() - start
    agent = load_agent_for(out / "models" / name / "best.pt", mode)
    run = partial(evaluate, agent, params["demos"]["level"], seeds, progress=False,
                  **dataclass_from_dict(EvaluateConfig, params["evaluate"], "evaluate").kwargs())  # fmt: skip
    episodes = run(mode)
    trained = json.loads(metrics.read_text())
    result = {**summarize(episodes), "frames": trained["frames"], "best_val_success": trained["best_val_success"],
              # the lower level on the validation demos, on its own thoughts and (TC) on the bot's
              "final_action_acc": trained["final_action_acc"],
              "final_oracle_action_acc": trained.get("final_oracle_action_acc"),
              "train_s": train_s, "eval_s": time.time() - start - train_s,
              "successes": [int(ep.success) for ep in episodes]}  # fmt: skip
    if name == "tc":  # how far better thoughts would take this lower level
        oracle = run("oracle")
        result["oracle"] = {**summarize(oracle), "successes": [int(ep.success) for ep in oracle]}
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--episodes", type=int, default=200, help="test episodes per agent")
    ap.add_argument("--agents", default=",".join(AGENTS), help="comma-separated subset of " + ",".join(AGENTS))
    args = ap.parse_args(argv)
    with user_errors():
        params = override(load_params(args.params), args.set)
        agents = args.agents.split(",")
        if unknown := set(agents) - set(AGENTS):
            raise UserError(f"--agents: unknown {sorted(unknown)}; expected some of {list(AGENTS)}")
        if args.episodes < 1:
            raise UserError(f"--episodes {args.episodes}: expected at least 1 test episode")
        params["evaluate"]["episodes"] = args.episodes  # this comparison's test seeds, checked below with the others
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "params.yaml").write_text(yaml.safe_dump(params))
        # Every section the stages read, checked before any of them runs (an --set typo or range).
        load_configs(args.out / "params.yaml", demos=DemosConfig, model=ModelConfig, train=TrainConfig,
                     evaluate=EvaluateConfig)  # fmt: skip
        report = run_all(args, params, agents)
    for a, r in report["agents"].items():
        print(f"{a}: {r['success_rate']:.3f} [{r['success_ci_low']:.3f}, {r['success_ci_high']:.3f}] "
              f"train {r['train_s']:.0f}s eval {r['eval_s']:.0f}s")  # fmt: skip
        if "oracle" in r:
            print(f"  oracle: {r['oracle']['success_rate']:.3f}")
    for k in ("tc_minus_bc", "tc_minus_tc_no_thoughts", "oracle_minus_tc"):
        if k in report:
            print(f"{k}: {report[k]}")


def run_all(args, params: dict, agents: list[str]) -> dict:
    """Demos, then each agent trained and evaluated (two at a time); writes and returns <out>/compare.json."""
    env = dict(os.environ)
    start = time.time()
    stage("stages/generate_demos.py", "--params", str(args.out / "params.yaml"), "--train-out",
          str(args.out / "demos/train"), "--val-out", str(args.out / "demos/val"), "--restart-if-changed", env=env)
    seeds = list(range(params["evaluate"]["seed"], params["evaluate"]["seed"] + args.episodes))
    # spawn: each job starts clean rather than as a fork of a process that has already set up torch
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        jobs = {a: pool.submit(train_and_evaluate, a, args.out, params, seeds, env) for a in agents}
        results = {a: job.result() for a, job in jobs.items()}
    report = {"overrides": args.set, "level": params["demos"]["level"], "wall_s": time.time() - start,
              "agents": results}  # fmt: skip
    for other in ("bc", "tc_no_thoughts"):
        if "tc" in results and other in results:
            report[f"tc_minus_{other}"] = paired_difference(results["tc"]["successes"], results[other]["successes"])
    if "tc" in results:
        report["oracle_minus_tc"] = paired_difference(results["tc"]["oracle"]["successes"], results["tc"]["successes"])
    write_json_atomic(args.out / "compare.json", report)
    return report


if __name__ == "__main__":
    main()
