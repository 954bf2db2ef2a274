"""Demo generation: the fast bot against minigrid's, its identity, and parallel efficiency.

Writes benchmarks/results/demo_generation.json with, at the top level:
- ``bot_speedup``: episodes/s of our generator's episode (fast bot and observation,
  thoughts, recording) over the bare minigrid bot (minigrid's env and bot, no thoughts,
  nothing recorded), one process, same seeds, timed in interleaved repeats, best of each
  (other jobs only ever slow a run down); ``bot_speedup_cpu`` is the same from CPU time
  (target >= 3).
- ``identical_seeds``: seeds on which both bots gave the same action and thought, and
  tc.fastobs the same observation as minigrid, at every step, with noise (1,000 BossLevel
  seeds and a few on every other BabyAI level), out of ``checked_seeds``.
- ``parallel_efficiency``: generator episodes/s with N processes / (N x with one), N = the
  cores, at a small shard size (the hardest case for per-shard pools; target >= 0.9).
  On a shared machine it says how many cores other jobs left, so also: ``cores_obtained``
  (CPU seconds of the generator's processes / wall seconds) and ``pool_busy_fraction``
  (time the N workers spent in episodes / (N x wall)): what the pool wastes itself.
- the machine, its load average while measuring, and the hours 1M paper demos take,
  extrapolated from one process's rate, the cores and the measured busy fraction.
"""

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from minigrid.utils.baby_ai_bot import BabyAIBot
from tqdm import tqdm

import tc.demos
from tc.demos import generate_demos, run_episode
from tc.envs import babyai_ids, make_env, reset_quiet
from tc.io import write_json_atomic
from tc.params import user_errors
from tc.thoughts import BotMismatch

PAPER_EPISODES = 1_000_000


def bare_minigrid_bot(level: str, seeds: range) -> None:
    """The unmodified minigrid bot on ``seeds``, nothing recorded."""
    for seed in seeds:
        env = make_env(level)
        reset_quiet(env, seed)
        bot, action = BabyAIBot(env), None
        while True:
            action = bot.replan(action)
            _, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                break


def episodes_with(bot: str):
    def run(level: str, seeds: range) -> None:
        for seed in seeds:
            run_episode(level, seed, 0.0, bot=bot)
    run.__name__ = f"{bot}_bot_with_thoughts"
    return run


def identity(cases: list[tuple[str, int]], noise_rate: float) -> list[str]:
    """Run both bots side by side on ``cases``; the mismatches, described."""
    mismatches = []
    for level, seed in tqdm(cases, desc="identity", unit="ep"):
        try:
            run_episode(level, seed, noise_rate, bot="check")
        except BotMismatch as err:
            mismatches.append(f"{level} seed {seed}: {err}")
        except Exception:  # both bots failed the same way: identical too
            pass
    return mismatches


# The pool's busy fraction: each worker appends the start and end of every episode it runs
# to its own file (the generator's episode function, wrapped here; workers are forked, so
# they run the wrapper and can find it by name).
_run_untimed = tc.demos._episode_or_failure
_episode_log: Path | None = None


def _timed_episode(args):
    start = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
    result = _run_untimed(args)
    with open(_episode_log / str(os.getpid()), "a") as f:
        f.write(f"{start} {time.perf_counter()}\n")
    return result


def generator_rate(level: str, episodes: int, workers: int, shard_size: int) -> dict:
    global _episode_log
    with tempfile.TemporaryDirectory() as tmp:
        _episode_log = Path(tmp) / "log"
        _episode_log.mkdir()
        tc.demos._episode_or_failure = _timed_episode
        t, before = time.perf_counter(), os.times()
        try:
            manifest = generate_demos(level, 10_000, episodes, Path(tmp) / "demos", noise_rate=0.01, workers=workers,
                                      shard_size=shard_size, bot="fast", progress=False)
        finally:
            tc.demos._episode_or_failure = _run_untimed
        seconds, after = time.perf_counter() - t, os.times()
        spans = [float(end) - float(start) for f in _episode_log.iterdir()
                 for start, end in (line.split() for line in f.read_text().splitlines())]
    cpu = sum(after[i] - before[i] for i in range(4))  # user + system, of this process and its workers
    return {"seconds": seconds, "episodes_per_s": episodes / seconds, "steps_per_s": manifest["num_steps"] / seconds,
            "failed": manifest["num_failed"], "workers": workers, "shard_size": shard_size,
            "cores_obtained": cpu / seconds, "pool_busy_fraction": sum(spans) / (workers * seconds),
            # the parent's own work (collecting episodes, writing shards) per episode
            "parent_cpu_s_per_episode": (after[0] + after[1] - before[0] - before[1]) / episodes}


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, {platform.machine()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--level", default="BabyAI-BossLevel-v0")
    ap.add_argument("--episodes", type=int, default=60, help="episodes per timed repeat of each bot")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--identity-seeds", type=int, default=1000, help="BossLevel seeds checked identical")
    ap.add_argument("--identity-per-level", type=int, default=3, help="seeds checked on every other BabyAI level")
    ap.add_argument("--identity-noise", type=float, default=0.05,
                    help="noise rate of the identity check (above the paper's 0.01: more recoveries from noise)")
    ap.add_argument("--gen-episodes", type=int, default=400, help="episodes of each generator run")
    ap.add_argument("--gen-repeats", type=int, default=2, help="generator runs per setting (best kept)")
    ap.add_argument("--shard-sizes", type=int, nargs="+", default=[10, 300])
    ap.add_argument("--out", default="benchmarks/results/demo_generation.json")
    args = ap.parse_args()
    load = {"start": os.getloadavg()}

    seeds = range(args.episodes)
    runners = [bare_minigrid_bot, episodes_with("minigrid"), episodes_with("fast")]
    wall = {run.__name__: [] for run in runners}
    cpu = {run.__name__: [] for run in runners}
    for _ in tqdm(range(args.repeats), desc="bots", unit="repeat"):
        for run in runners:  # interleaved: every bot sees the same machine load
            t, c = time.perf_counter(), time.process_time()
            run(args.level, seeds)
            wall[run.__name__].append(time.perf_counter() - t)
            cpu[run.__name__].append(time.process_time() - c)
    rate = {name: args.episodes / min(ts) for name, ts in wall.items()}
    cpu_rate = {name: args.episodes / min(ts) for name, ts in cpu.items()}
    load["after_bots"] = os.getloadavg()

    cases = [(args.level, 20_000 + i) for i in range(args.identity_seeds)]
    cases += [(level, seed) for level in babyai_ids() if level != args.level for seed in range(args.identity_per_level)]
    mismatches = identity(cases, args.identity_noise)
    load["after_identity"] = os.getloadavg()

    cores = os.cpu_count()
    runs = {"1": [], **{str(size): [] for size in args.shard_sizes}}
    for _ in tqdm(range(args.gen_repeats), desc="generator", unit="repeat"):
        runs["1"].append(generator_rate(args.level, args.gen_episodes, 1, args.shard_sizes[0]))
        for size in args.shard_sizes:
            runs[str(size)].append(generator_rate(args.level, args.gen_episodes, cores, size))
    best = {key: max(rs, key=lambda r: r["episodes_per_s"]) for key, rs in runs.items()}
    one, many = best.pop("1"), list(best.values())
    load["end"] = os.getloadavg()
    efficiency = {str(m["shard_size"]): m["episodes_per_s"] / (cores * one["episodes_per_s"]) for m in many}
    busy = min(m["pool_busy_fraction"] for m in many)

    result = {
        "level": args.level,
        "machine": machine(),
        "load_average": load,
        "bot_speedup": rate["fast_bot_with_thoughts"] / rate["bare_minigrid_bot"],
        "bot_speedup_cpu": cpu_rate["fast_bot_with_thoughts"] / cpu_rate["bare_minigrid_bot"],
        "fast_vs_minigrid_with_thoughts": rate["fast_bot_with_thoughts"] / rate["minigrid_bot_with_thoughts"],
        "episodes_per_s": rate,
        "episodes_per_cpu_s": cpu_rate,
        "thought_overhead_minigrid": rate["bare_minigrid_bot"] / rate["minigrid_bot_with_thoughts"] - 1,
        "repeats": args.repeats,
        "episodes_per_repeat": args.episodes,
        "identical_seeds": len(cases) - len(mismatches),
        "checked_seeds": len(cases),
        "identity_check": {"boss_level_seeds": args.identity_seeds, "other_levels": len(babyai_ids()) - 1,
                           "seeds_per_other_level": args.identity_per_level, "noise_rate": args.identity_noise,
                           "mismatches": mismatches},
        "parallel_efficiency": min(efficiency.values()),
        "parallel_efficiency_by_shard_size": efficiency,
        "pool_busy_fraction": busy,
        "processes": cores,
        "generator_1_process": one,
        "generator_n_processes": many,
        "generator_repeats": args.gen_repeats,
        "bot_success_rate": 1 - sum(m["failed"] for m in many) / (len(many) * args.gen_episodes),
        # 1M paper demos on n cores of this kind, each as fast as one process here, the pool
        # as busy as measured (on a shared machine the measured efficiency is the cores left).
        "paper_1m_hours": {str(n): PAPER_EPISODES / (one["episodes_per_s"] * n * (busy if n > 1 else 1)) / 3600
                           for n in (1, 16, 64)},
    }
    write_json_atomic(Path(args.out), result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    with user_errors():  # a missing or malformed input: one line
        main()
