"""Evaluation throughput: episodes/s at batch 1 vs batch 64 (one forward pass per step for the batch).

    python benchmarks/eval_throughput.py [--checkpoint models/tc/best.pt] [--episodes 64] [--max-steps 16]
    python benchmarks/eval_throughput.py --level BabyAI-MiniBossLevel-v0 --batch-sizes 64 --threads 1 --reference

``--reference`` also times minigrid's own observation and bot (``evaluate(fast=False)``) in
the same run and reports ``<mode>_..._fast_vs_minigrid`` (time ratio; > 1: ours is faster).
``--compile MODE`` also times the agent with its steps compiled (``evaluate.compile``) and
reports ``<mode>_..._compiled_vs_eager`` (time ratio; > 1: compiled is faster).
``--workers N`` also times the environments stepped in N processes (``evaluate.workers``)
and reports ``<mode>_..._workers_vs_one`` (time ratio; > 1: the workers are faster).
``--cuda-graphs`` (CUDA) also times the agent's steps replayed from CUDA graphs
(``evaluate.cuda_graphs``) and reports ``<mode>_..._graphs_vs_eager`` (> 1: the graphs are faster).
With more than one of these three, they are also timed all at once: ``<mode>_..._together_vs_eager``.

Every episode is capped at ``--max-steps`` so that both batch sizes do the same work
(an untrained agent would otherwise wander to the level's limit). Without a checkpoint
an untrained agent of params.yaml's model config is timed: the speed does not depend on
the weights. Each setting is timed ``--repeats`` times in the same run; the median is
reported, for each torch intra-op thread count of ``--threads`` (on a small shared CPU one
thread can beat two at batch 1 and lose at batch 64). Writes
benchmarks/results/eval_throughput.json.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from tc.io import write_json_atomic
from tc.evaluate import evaluate
from tc.checkpoint import load_agent
from tc.kernels import COMPILE_MODES
from tc.model import Agent, ModelConfig, compile_or_warn
from tc.params import load_params, user_errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="model config when no checkpoint is given")
    parser.add_argument("--checkpoint", help="agent to time (default: untrained, params.yaml model config)")
    parser.add_argument("--level", default="BabyAI-BossLevel-v0")
    parser.add_argument("--episodes", type=int, default=64)
    parser.add_argument("--max-steps", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--modes", nargs="+", default=["tc", "bc", "oracle"], choices=["tc", "bc", "oracle"])
    parser.add_argument("--reference", action="store_true",
                        help="also time minigrid's own observation and bot (evaluate fast=False), side by side")
    parser.add_argument("--compile", choices=COMPILE_MODES, help="also time the agent compiled in this mode")
    parser.add_argument("--workers", type=int, help="also time the environments stepped in this many processes")
    parser.add_argument("--cuda-graphs", action="store_true", help="also time the agent's steps from CUDA graphs (CUDA)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=sorted({1, torch.get_num_threads()}),
                        help="torch intra-op thread counts to time (default: 1 and torch's default)")
    parser.add_argument("--out", default="benchmarks/results/eval_throughput.json")
    args = parser.parse_args()
    if args.cuda_graphs and args.device != "cuda":
        parser.error("--cuda-graphs needs --device cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")

    seeds = list(range(args.episodes))
    load_at_start = os.getloadavg()
    if args.checkpoint:  # its own mode only
        agent = load_agent(args.checkpoint, args.device)
        agents = {"tc" if agent.cfg.use_thoughts else "bc": agent}
    else:
        cfg = load_params(args.params, "model")["model"]
        torch.manual_seed(0)
        agents = {mode: Agent(ModelConfig.from_dict({**cfg, "use_thoughts": mode != "bc"})).to(args.device)
                  for mode in args.modes}  # fmt: skip

    def write(results: dict) -> None:
        write_json_atomic(Path(args.out), {
            "results": results,
            "setup": {
                "level": args.level, "episodes": args.episodes, "max_steps": args.max_steps, "repeats": args.repeats,
                "checkpoint": args.checkpoint, "torch": torch.__version__, "threads": args.threads,
                "device": args.device if args.device == "cpu" else f"cuda: {torch.cuda.get_device_name()}",
                "compile": args.compile, "workers": args.workers, "cuda_graphs": args.cuda_graphs,
                "cpus": os.cpu_count(), "machine": platform.machine(),
                "load_avg_at_start": load_at_start, "load_avg_at_end": os.getloadavg(),
            },
        })  # fmt: skip

    results = {}
    for mode, agent in agents.items():
        variants = {"": (agent, True, 1, False)}  # key suffix: (agent, fast, workers, CUDA graphs)
        if args.reference:
            variants["_minigrid"] = (agent, False, 1, False)
        if args.compile:
            compiled = copy.deepcopy(agent)
            if compile_or_warn(compiled, args.compile, "--compile"):
                variants["_compiled"] = (compiled, True, 1, False)
        if args.workers:
            variants["_workers"] = (agent, True, args.workers, False)
        if args.cuda_graphs:
            variants["_graphs"] = (agent, True, 1, True)
        if sum(map(bool, (args.workers, "_compiled" in variants, args.cuda_graphs))) > 1:  # all of them at once
            fastest = variants["_compiled"][0] if "_compiled" in variants else agent
            variants["_together"] = (fastest, True, args.workers or 1, args.cuda_graphs)
        for threads in args.threads:
            torch.set_num_threads(threads)
            for batch in args.batch_sizes:
                for suffix, (timed, fast, workers, graphs) in variants.items():
                    # warm-up (a compiled agent compiles here, for the sizes of this batch; graphs are
                    # captured in every evaluate call, so their capture is in the timed runs)
                    evaluate(timed, args.level, seeds[:batch], mode, batch_size=batch, max_steps=4, progress=False)
                    times = []
                    for _ in range(args.repeats):  # alternating would be fairer on a busy machine; repeats are adjacent
                        start = time.perf_counter()
                        eps = evaluate(timed, args.level, seeds, mode, batch_size=batch, max_steps=args.max_steps,
                                       progress=False, fast=fast, workers=workers, cuda_graphs=graphs)  # fmt: skip
                        times.append(time.perf_counter() - start)
                    steps, med = sum(e.length for e in eps), statistics.median(times)
                    key = f"{mode}_threads{threads}_batch{batch}{suffix}"
                    results[key] = {"episodes_per_s": len(seeds) / med, "steps_per_s": steps / med, "median_s": med,
                                    "times_s": times, "steps": steps}  # fmt: skip
                    rate = f"{len(seeds) / med:.2f} episodes/s, {steps / med:.0f} steps/s"
                    print(f"{key}: {rate} (median of {args.repeats})")
                key = f"{mode}_threads{threads}_batch{batch}"
                base = results[key]["median_s"]  # ours, eager
                if "_minigrid" in variants:  # > 1: ours is faster than minigrid's
                    results[f"{key}_fast_vs_minigrid"] = results[f"{key}_minigrid"]["median_s"] / base
                if "_compiled" in variants:  # > 1: compiled is faster than eager
                    results[f"{key}_compiled_vs_eager"] = base / results[f"{key}_compiled"]["median_s"]
                if "_workers" in variants:  # > 1: the worker processes are faster than stepping here
                    results[f"{key}_workers_vs_one"] = base / results[f"{key}_workers"]["median_s"]
                if "_graphs" in variants:  # > 1: the CUDA graphs are faster than eager steps
                    results[f"{key}_graphs_vs_eager"] = base / results[f"{key}_graphs"]["median_s"]
                if "_together" in variants:  # > 1: the speed settings together are faster than none
                    results[f"{key}_together_vs_eager"] = base / results[f"{key}_together"]["median_s"]
            first = results[f"{mode}_threads{threads}_batch{args.batch_sizes[0]}"]["episodes_per_s"]
            for batch in args.batch_sizes[1:]:
                key = f"{mode}_threads{threads}_speedup_batch{batch}_vs_{args.batch_sizes[0]}"
                results[key] = results[f"{mode}_threads{threads}_batch{batch}"]["episodes_per_s"] / first
        write(results)  # after every mode: a run stopped by a time limit keeps what it measured
    print(f"wrote {args.out}")


if __name__ == "__main__":
    with user_errors():  # a missing or malformed input: one line
        main()
