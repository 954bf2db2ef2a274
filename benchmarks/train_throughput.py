"""Training throughput (frames/s) and peak memory of tc.train at paper size and default size.

Writes benchmarks/results/train_throughput.json. Each (size, agent, threads) runs in its
own process (so peak RSS is its own): real BossLevel demos, batches formed as in training
(``epoch_batches``), one warm-up update, then the median over ``--updates`` timed updates
(batch gathering + forward + backward + clip + Adam step) with teacher forcing on (the
ratio of early training). Target (issue 4), 2-core CPU: >= 42 frames/s at paper size
(2x the public code's 21) with peak RSS < 5.3 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import yaml

from tc.demos import generate_demos, load_demos
from tc.io import write_json_atomic
from tc.model import Agent, ModelConfig, count_parameters
from tc.train import TrainConfig, epoch_batches, make_batch, train_update

ROOT = Path(__file__).resolve().parents[1]
SIZES = {
    # Paper architecture; batch 16 episodes as in the public code's speed measurement (SPEC).
    "paper": ({"image_dim": 128, "memory_dim": 2048, "instr_dim": 256}, {"batch_size": 16, "recurrence": 80}),
    "default": None,  # params.yaml's model and train sections
}


def size_config(name: str) -> tuple[ModelConfig, TrainConfig]:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    model, train = dict(params["model"]), dict(params["train"])
    if SIZES[name] is not None:
        model.update(SIZES[name][0])
        train.update(SIZES[name][1])
    return ModelConfig(**model), TrainConfig.from_dict(train)


def run_one(size: str, agent_kind: str, threads: int, demos_dir: str, updates: int) -> dict:
    """Time ``updates`` training updates in this process; returns the measurement."""
    torch.set_num_threads(threads)
    model_cfg, cfg = size_config(size)
    model_cfg = replace(model_cfg, use_thoughts=agent_kind == "tc")
    cfg = replace(cfg, device="cpu")
    demos = load_demos(demos_dir)
    batches = epoch_batches(demos.offsets[1:] - demos.offsets[:-1], replace(cfg, episodes_per_epoch=demos.num_episodes), 0)
    torch.manual_seed(0)
    agent = Agent(model_cfg)
    optimizer = torch.optim.Adam(agent.parameters(), lr=cfg.lr, eps=cfg.adam_eps)
    rates, seconds, frames, steps = [], [], [], []
    for i in range(updates + 1):
        t = time.perf_counter()
        batch = make_batch(demos, batches[i % len(batches)], torch.device("cpu"))
        train_update(agent, optimizer, batch, cfg, True, False)
        dt = time.perf_counter() - t
        if i > 0:  # the first update warms up allocators and oneDNN kernels
            rates.append(batch.frames / dt)
            seconds.append(dt)
            frames.append(batch.frames)
            steps.append(len(batch.sizes))
    return {
        "size": size,
        "agent": agent_kind,
        "threads": threads,
        "model": asdict(model_cfg),
        "batch_size": cfg.batch_size,
        "recurrence": cfg.recurrence,
        "sort_window": cfg.sort_window,
        "parameters": count_parameters(agent),
        "frames_per_s_median": statistics.median(rates),
        "frames_per_s": rates,
        "update_s": seconds,
        "frames_per_update": frames,
        "steps_per_update": steps,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--demos", help="BossLevel demos directory (default: generate --episodes into a temp dir)")
    ap.add_argument("--episodes", type=int, default=96, help="episodes to generate when --demos is not given")
    ap.add_argument("--sizes", default="paper,default")
    ap.add_argument("--agents", default="tc", help="comma-separated: tc, bc")
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts to measure")
    ap.add_argument("--updates", type=int, default=4, help="timed updates (after one warm-up)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/train_throughput.json"))
    ap.add_argument("--one", nargs=3, metavar=("SIZE", "AGENT", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one:  # child process: one measurement, printed as JSON
        size, agent_kind, threads = args.one
        print(json.dumps(run_one(size, agent_kind, int(threads), args.demos, args.updates)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        demos_dir = args.demos
        if demos_dir is None:
            demos_dir = str(Path(tmp) / "demos")
            generate_demos("BabyAI-BossLevel-v0", 0, args.episodes, demos_dir, progress=False)
        manifest = load_demos(demos_dir).manifest
        load_before = os.getloadavg()
        results = []
        for size in args.sizes.split(","):
            for agent_kind in args.agents.split(","):
                for threads in args.threads.split(","):
                    cmd = [sys.executable, __file__, "--one", size, agent_kind, threads, "--demos", demos_dir,
                           "--updates", str(args.updates)]
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                    results.append(json.loads(out.strip().splitlines()[-1]))
                    r = results[-1]
                    print(f"{size:8s} {agent_kind} threads={threads}: {r['frames_per_s_median']:.1f} frames/s, "
                          f"peak RSS {r['peak_rss_gb']:.2f} GB", flush=True)
    report = {
        "benchmark": "train_throughput",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "note": "load average > cores means other processes shared the CPU (contended timing)",
        "data": {"level": manifest["level"], "episodes": manifest["num_episodes"], "steps": manifest["num_steps"]},
        "targets": {"paper_frames_per_s": 42.0, "paper_peak_rss_gb": 5.3,
                    "public_code_paper_frames_per_s": 21.0, "public_code_small_frames_per_s": 149.0},
        "results": results,
    }
    paper = [r for r in results if r["size"] == "paper" and r["agent"] == "tc"]
    if paper:
        best = max(paper, key=lambda r: r["frames_per_s_median"])
        report["paper_tc_best"] = {"threads": best["threads"], "frames_per_s": best["frames_per_s_median"],
                                   "peak_rss_gb": best["peak_rss_gb"],
                                   "meets_targets": best["frames_per_s_median"] >= 42 and best["peak_rss_gb"] < 5.3}
    write_json_atomic(Path(args.out), report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
