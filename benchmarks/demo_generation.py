"""Speed of demo generation: bare minigrid bot vs ours with thoughts, 1 vs 2 processes.

Writes benchmarks/results/demo_generation.json. Targets (issue 3): thought extraction
costs <= 10% over the bare bot; 2 processes >= 1.8x one; BossLevel bot success >= 99.5%.
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from minigrid.utils.baby_ai_bot import BabyAIBot

from tc.demos import generate_demos, run_episode
from tc.io import write_json_atomic
from tc.envs import make_env, reset_quiet


def bare_bot(level: str, seeds: range) -> int:
    """Steps taken by the unmodified minigrid bot on ``seeds`` (no recording)."""
    steps = 0
    for seed in seeds:
        env = make_env(level)
        reset_quiet(env, seed)
        bot, action = BabyAIBot(env), None
        while True:
            action = bot.replan(action)
            _, _, terminated, truncated, _ = env.step(action)
            steps += 1
            if terminated or truncated:
                break
    return steps


def with_thoughts(level: str, seeds: range) -> int:
    return sum(len(run_episode(level, seed, 0.0).actions) for seed in seeds)


def timed(fn, *args) -> tuple[float, int]:
    t = time.perf_counter()
    steps = fn(*args)
    return time.perf_counter() - t, steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--level", default="BabyAI-BossLevel-v0")
    ap.add_argument("--episodes", type=int, default=100, help="episodes per timed repeat (bare vs thoughts)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--gen-episodes", type=int, default=1000, help="episodes for the 1- and 2-process generator runs")
    ap.add_argument("--out", default="benchmarks/results/demo_generation.json")
    args = ap.parse_args()

    seeds = range(args.episodes)
    bare, ours = [], []
    for _ in range(args.repeats):  # interleaved so both see the same machine load
        bare.append(timed(bare_bot, args.level, seeds))
        ours.append(timed(with_thoughts, args.level, seeds))
    steps = bare[0][1]
    t_bare = statistics.median(t for t, _ in bare)
    t_ours = statistics.median(t for t, _ in ours)

    gen = {}
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            manifest = generate_demos(args.level, 10_000, args.gen_episodes, Path(tmp), noise_rate=0.01,
                                      workers=workers, shard_size=250, progress=False)
            dt = time.perf_counter() - t
        gen[workers] = {"seconds": dt, "episodes_per_s": args.gen_episodes / dt,
                        "steps_per_s": manifest["num_steps"] / dt, "failed": manifest["num_failed"]}

    result = {
        "level": args.level,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "bare_bot": {"episodes_per_s": args.episodes / t_bare, "steps_per_s": steps / t_bare},
        "bot_with_thoughts": {"episodes_per_s": args.episodes / t_ours, "steps_per_s": steps / t_ours},
        "thought_overhead": t_ours / t_bare - 1,
        "generator_1_process": gen[1],
        "generator_2_processes": gen[2],
        "speedup_2_vs_1": gen[1]["seconds"] / gen[2]["seconds"],
        "bot_success_rate": 1 - gen[2]["failed"] / args.gen_episodes,
        "bot_success_episodes": args.gen_episodes,
        "repeats": args.repeats,
    }
    write_json_atomic(Path(args.out), result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
