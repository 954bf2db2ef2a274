"""Training throughput (frames/s) and peak memory at paper size, ours next to the public code, in one run.

Writes benchmarks/results/train_throughput_<device>.json. Every measurement runs in its
own process (so peak memory is its own), one after the other on the same machine:

- ours: TC and BC agents of paper size (image 128, memory 2048, instr 256, recurrence
  80) on real BossLevel demos, batches formed as in training (``epoch_batches``,
  grouped by length: ``--sort-window``, default 16; 1: the paper's random batches), teacher forcing on (early training) and, with ``--teacher-forcing on,off``, off
  (free running: the upper level's own greedy thoughts drive the lower level; a paper run's
  batches are ~47% free-running: ratio 1 for 10 of 160 epochs, then linear to 0); ``--warmup`` warm-up updates
  (default 1; compiled steps recompile for the first few batches' shapes, so give them
  more), then frames / seconds over ``--updates`` timed updates (gathering + forward +
  backward + Adam step);
- the public TC code (``--public``, by default ../shared/baselines/public_tc/bench_public.py):
  its own training step on synthetic episodes of the mean BossLevel length (87 steps), with its
  teacher-forcing ratio 1 or (off) 0.

Grid: batch 16 on CPU; batch 16 and 180 on CUDA, each in fp32 (on CUDA torch's default: cuDNN's
convolutions in TF32), with TF32 matmuls (ours only:
``train.tf32``) and with autocast (ours: ``train.amp``'s bfloat16; the public code: its fp16
GradScaler default), or the ``--precisions`` given; ours eager and, with
``--compile`` (default on CUDA), with its steps compiled (``train.compile``; the warm-up
update then includes the compilation). Top-level keys: ``ratio_vs_public`` (ours TC / public
TC frames/s, each at its fastest setting; batch 180 on CUDA, 16 on CPU), ``amp_vs_fp32``,
``tf32_vs_fp32`` and ``graphs_vs_eager`` (ours TC, each side at its fastest of the other settings measured with
both; graphs: ``--cuda-graphs``, ``train.cuda_graphs``, padded batches replayed from CUDA graphs; with ``--compile``,
graphs are measured with each compile setting too), ``compiled_vs_eager`` (ours TC without graphs) and
``device``; with teacher forcing off measured, ``free_running_ratio_vs_public`` and
``free_running_vs_teacher_forced`` (ours TC). Frames are real frames: a padded batch counts its valid rows. The file is rewritten
after every measurement (``"complete": false`` until the grid is done), so that a run stopped by a
time limit keeps what it measured.
Targets: CPU >= 2x the public code at batch 16; CUDA >= 5x at batch 180.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from demo_generation import machine  # benchmarks/, the script's own folder
from tc.demos import generate_demos, load_demos
from tc.io import write_json_atomic
from tc.kernels import COMPILE_MODES
from tc.model import Agent, ModelConfig, compile_or_warn, count_parameters
from tc.params import user_errors
from tc.train import ChunkGraphs, Padding, TrainConfig, epoch_batches, loss_scale, make_batch, train_update, use_tf32

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = ROOT.parent / "shared/baselines/public_tc/bench_public.py"
PAPER_MODEL = {"image_dim": 128, "memory_dim": 2048, "instr_dim": 256}
PRECISIONS = ("fp32", "tf32", "amp")  # fp32; TensorFloat-32 matmuls (train.tf32); autocast (train.amp)


def run_ours(agent_kind: str, device: str, batch_size: int, precision: str, threads: int, demos_dir: str, updates: int,
             compile: str | None = None, warmup: int = 1, graphs: bool = False, teacher_forcing: bool = True,
             sort_window: int = 16, layout: str = "episodes") -> dict:
    """Time ``updates`` training updates of our agent in this process; returns the measurement."""
    dev = torch.device(device)
    if threads > 0:
        torch.set_num_threads(threads)
    amp = precision == "amp"
    model_cfg = ModelConfig(**PAPER_MODEL, use_thoughts=agent_kind == "tc")
    demos = load_demos(demos_dir)
    cfg = TrainConfig(batch_size=batch_size, recurrence=80, device=device, amp=amp, tf32=precision == "tf32",
                      episodes_per_epoch=demos.num_episodes, cuda_graphs=graphs, sort_window=sort_window,
                      layout=layout)  # fmt: skip
    use_tf32(cfg, dev)
    batches = epoch_batches(demos.offsets[1:] - demos.offsets[:-1], cfg, 0)
    torch.manual_seed(0)
    agent = Agent(model_cfg).to(dev).train()
    compiled = compile_or_warn(agent, compile, "--compile")
    optimizer = torch.optim.Adam(agent.parameters(), lr=cfg.lr, eps=cfg.adam_eps)
    scale = loss_scale(demos, cfg)
    runner = ChunkGraphs(agent, cfg, scale, amp) if graphs else None
    padding = Padding.of(demos, cfg) if graphs else None
    seconds, frames, rows = [], [], []
    timed = list(range(warmup, warmup + updates))
    # The first updates warm up allocators, kernels and compilation; with graphs, the timed batches
    # also run once untimed, so that every chunk length they need is captured before timing.
    schedule = list(range(warmup)) + (timed if graphs else []) + timed
    for n, i in enumerate(schedule):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        batch = make_batch(demos, batches[i % len(batches)], dev, padding=padding)
        train_update(agent, optimizer, batch, cfg, teacher_forcing, amp and dev.type == "cuda", scale, runner)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if n >= len(schedule) - updates:
            seconds.append(time.perf_counter() - t)
            frames.append(batch.frames)
            rows.append(batch.starts[-1])
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 1e9
    return {"impl": "ours", "agent": agent_kind, "batch": batch_size, "precision": precision, "threads": threads,
            "teacher_forcing": teacher_forcing or agent_kind == "bc", "sort_window": sort_window, "layout": layout,
            "compile": compile if compiled else None, "warmup_updates": warmup,
            "cuda_graphs": graphs and runner.problem is None, "cuda_graphs_problem": runner and runner.problem,
            "graphs_captured": len(runner.graphs) if runner else 0,
            "parameters": count_parameters(agent),
            "frames_per_s": sum(frames) / sum(seconds), "update_s": seconds, "frames_per_update": frames,
            "rows_per_frame": sum(rows) / sum(frames),  # > 1: padded batches (CUDA graphs) compute more rows
            "peak_memory_gb": peak, "peak_memory_kind": "cuda max allocated" if dev.type == "cuda" else "max RSS",
            "model": asdict(model_cfg)}


def run_public(public: Path, device: str, batch_size: int, precision: str, updates: int, tmp: str,
               teacher_forcing: bool = True) -> dict:
    """The public code's training step; ``precision`` amp: its fp16 autocast with a GradScaler;
    ``teacher_forcing`` False: its teacher-forcing ratio 0 (free running)."""
    amp = precision == "amp"
    out = Path(tmp) / f"public_{batch_size}_{precision}_{int(teacher_forcing)}.json"
    # Free running, its loss indexes every target position in its greedy decoder's 15: a synthetic thought
    # at the default cap of 16 tokens (start and end included) fails. BossLevel's thoughts are far shorter.
    forcing = ["--tf-ratio", "1"] if teacher_forcing else ["--tf-ratio", "0", "--sg-max-tokens", "15"]
    cmd = [sys.executable, str(public), "--device", device, "--batch", str(batch_size), "--updates", str(updates),
           *forcing, "--json", str(out)] + ([] if amp else ["--no-amp"])
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=public.parent)
    res = json.loads(out.read_text())
    res["public_impl"] = res.pop("impl", None)  # our "impl" key names the side of the comparison
    return {**res, "impl": "public", "agent": "tc", "batch": batch_size, "precision": precision,
            "teacher_forcing": teacher_forcing,
            "peak_memory_gb": res["peak_memory_mib"] * 2**20 / 1e9}


def ratios(results: list[dict], device: str) -> dict:
    """``ratio_vs_public``, ``amp_vs_fp32``, ``tf32_vs_fp32``... of TC at the device's key batch (each side at its
    fastest setting), teacher-forced; ``free_running_*`` of free-running TC."""

    def runs(impl: str, batch: int, teacher_forcing: bool = True, **setting) -> list[dict]:
        return [r for r in results if r["impl"] == impl and r["agent"] == "tc" and r["batch"] == batch
                and "error" not in r and r.get("teacher_forcing", True) == teacher_forcing
                and all(r.get(k) == v for k, v in setting.items())]

    def best(impl: str, batch: int, teacher_forcing: bool = True, **setting) -> float | None:
        return max((r["frames_per_s"] for r in runs(impl, batch, teacher_forcing, **setting)), default=None)

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    def versus(key: str, a: object, b: object) -> float | None:
        """Ours TC with ``key`` ``a`` against ``b``, each at its fastest of the other settings measured with
        both: a run cut by a time limit (TF32 graphed, say) must not set TF32 eager against fp32 graphed."""
        others = lambda r: tuple(r.get(k) for k in ("precision", "compile", "cuda_graphs") if k != key)  # noqa: E731
        common = {others(r) for r in runs("ours", batch, **{key: a})} & {others(r) for r in runs("ours", batch, **{key: b})}
        fastest = lambda v: max((r["frames_per_s"] for r in runs("ours", batch, **{key: v}) if others(r) in common),  # noqa: E731
                                default=None)  # fmt: skip
        return ratio(fastest(a), fastest(b))

    batch = 16 if device == "cpu" else 180
    eager = best("ours", batch, compile=None, cuda_graphs=False)
    compiled = max(filter(None, (best("ours", batch, compile=m, cuda_graphs=False) for m in COMPILE_MODES)), default=None)
    return {"ratio_vs_public": ratio(best("ours", batch), best("public", batch)),
            "amp_vs_fp32": versus("precision", "amp", "fp32"),
            "tf32_vs_fp32": versus("precision", "tf32", "fp32"),
            "compiled_vs_eager": ratio(compiled, eager),
            "graphs_vs_eager": versus("cuda_graphs", True, False),
            "free_running_ratio_vs_public": ratio(best("ours", batch, False), best("public", batch, False)),
            "free_running_vs_teacher_forced": ratio(best("ours", batch, False), best("ours", batch)),
            "ratio_batch": batch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--demos", help="BossLevel demos directory (default: generate --episodes into a temp dir)")
    ap.add_argument("--episodes", type=int, default=96, help="episodes to generate when --demos is not given")
    ap.add_argument("--agents", default="tc,bc", help="comma-separated: tc, bc")
    ap.add_argument("--batches", help="comma-separated batch sizes (default: 16 on cpu, 16,180 on cuda)")
    ap.add_argument("--updates", type=int, default=3, help="timed updates of each measurement of ours")
    ap.add_argument("--warmup", type=int, default=1, help="untimed updates of ours before them")
    ap.add_argument("--threads", default="1,2", help="comma-separated torch CPU thread counts for ours (the public "
                    "code runs with torch's default)")
    ap.add_argument("--public", default=str(PUBLIC), help="the public code's bench_public.py ('' to skip it)")
    ap.add_argument("--compile", help="comma-separated: none and/or torch.compile modes of ours "
                    f"({', '.join(COMPILE_MODES)}); default: none on cpu (no gain, measured), none,default on cuda")
    ap.add_argument("--precisions", help=f"comma-separated: {', '.join(PRECISIONS)} (amp: ours bfloat16 autocast, the "
                    "public code fp16 autocast); default: fp32 on cpu, all on cuda")
    ap.add_argument("--cuda-graphs", action="store_true", help="also measure ours with train.cuda_graphs (CUDA only)")
    ap.add_argument("--teacher-forcing", default="on", help="comma-separated: on (the lower level acts on the true "
                    "thoughts) and/or off (free running, TC only: BC is measured once)")
    ap.add_argument("--sort-window", type=int, default=16, help="ours: batches per window grouped by episode length "
                    "(train.sort_window; 1: random batches, the paper's)")
    ap.add_argument("--layout", default="episodes", choices=["episodes", "chunks"], help="ours: train.layout (chunks: "
                    "a batch's chunks side by side after a pass without gradients; not with --cuda-graphs)")
    ap.add_argument("--out", help="default: benchmarks/results/train_throughput_<device>.json")
    ap.add_argument("--one", nargs=7, metavar=("AGENT", "BATCH", "PRECISION", "THREADS", "COMPILE", "GRAPHS", "TF"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")

    if args.one:  # child process: one measurement of ours, printed as JSON
        agent_kind, batch, precision, threads, mode, graphs, tf = args.one
        print(json.dumps(run_ours(agent_kind, args.device, int(batch), precision, int(threads), args.demos,
                                  args.updates, None if mode == "none" else mode, args.warmup, graphs == "1", tf == "on",
                                  args.sort_window, args.layout)))
        return

    batches = [int(b) for b in (args.batches or ("16" if args.device == "cpu" else "16,180")).split(",")]
    precisions = (args.precisions or ("fp32" if args.device == "cpu" else "fp32,tf32,amp")).split(",")
    if set(precisions) - set(PRECISIONS) or (args.device == "cpu" and precisions != ["fp32"]):
        raise SystemExit(f"--precisions {args.precisions}: expected some of {', '.join(PRECISIONS)} (CUDA), fp32 (cpu)")
    compiles = (args.compile or ("none" if args.device == "cpu" else "none,default")).split(",")
    if set(compiles) - {"none", *COMPILE_MODES}:
        raise SystemExit(f"--compile {args.compile}: expected none or one of {', '.join(COMPILE_MODES)}")
    forcings = args.teacher_forcing.split(",")
    if not forcings or set(forcings) - {"on", "off"} or len(set(forcings)) < len(forcings):
        raise SystemExit(f"--teacher-forcing {args.teacher_forcing}: expected on, off or on,off")
    if args.sort_window < 1:
        raise SystemExit(f"--sort-window {args.sort_window}: expected an integer >= 1")
    if args.cuda_graphs and args.device != "cuda":
        raise SystemExit("--cuda-graphs: CUDA graphs need --device cuda")
    if args.cuda_graphs and args.layout == "chunks":
        raise SystemExit("--cuda-graphs: the graphs record chunks in sequence; --layout chunks runs eagerly")
    public = Path(args.public).resolve() if args.public else None  # run_public runs it from its own folder
    if public is not None and not public.is_file():
        raise SystemExit(f"--public {public}: no such file (pass --public '' to measure ours alone)")
    out = Path(args.out or ROOT / f"benchmarks/results/train_throughput_{args.device}.json")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else machine()
    results = []

    def write(manifest: dict, load_before: tuple, complete: bool) -> dict:
        """The report so far, written after every measurement: a run stopped by a time limit keeps what it measured."""
        report = {
            "benchmark": "train_throughput",
            "device": f"{args.device}: {device_name}" + (f", {os.cpu_count()} cores" if args.device == "cuda" else ""),
            **ratios(results, args.device),
            "complete": complete,  # false: stopped before the end of the grid
            "torch": torch.__version__,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "note": "load average > cores means other processes shared the machine (contended timing; the ratio "
                    "still compares runs taken one after the other under it)",
            "data": {"ours": {"level": manifest["level"], "episodes": manifest["num_episodes"],
                              "steps": manifest["num_steps"]},
                     "public": "synthetic episodes of 87 steps (the mean BossLevel bot episode)"},
            "results": results,
        }  # fmt: skip
        write_json_atomic(out, report)
        return report

    with tempfile.TemporaryDirectory() as tmp:
        demos_dir = args.demos
        if demos_dir is None:
            demos_dir = str(Path(tmp) / "demos")
            generate_demos("BabyAI-BossLevel-v0", 0, args.episodes, demos_dir, progress=False)
        manifest = load_demos(demos_dir).manifest
        load_before = os.getloadavg()
        for batch, precision, tf in itertools.product(batches, precisions, forcings):
            agents = [a for a in args.agents.split(",") if tf == "on" or a == "tc"]  # BC has no thoughts to force
            runs = [("ours", agent_kind, threads, mode, graphs) for agent_kind in agents
                    for threads in (args.threads.split(",") if args.device == "cpu" else ["0"])
                    for mode in compiles for graphs in (["0", "1"] if args.cuda_graphs else ["0"])]  # fmt: skip
            # the public code first: a run stopped by a time limit can still give ratio_vs_public
            # (the public code has no TF32 setting: it is timed in fp32 and with its autocast)
            timed_public = public is not None and precision != "tf32"
            for impl, agent_kind, threads, mode, graphs in ([("public", "tc", None, "none", "0")] if timed_public else []) + runs:
                setting = (f"{impl:6s} {agent_kind} batch {batch} {precision}{' free running' if tf == 'off' else ''}"
                           f"{f' threads {threads}' if threads not in (None, '0') else ''}"
                           f"{f' compile {mode}' if mode != 'none' else ''}{' cuda graphs' if graphs == '1' else ''}")
                try:
                    if impl == "public":
                        results.append(run_public(public, args.device, batch, precision, args.updates, tmp, tf == "on"))
                    else:
                        cmd = [sys.executable, __file__, "--device", args.device, "--demos", demos_dir,
                               "--updates", str(args.updates), "--warmup", str(args.warmup),
                               "--sort-window", str(args.sort_window), "--layout", args.layout,
                               "--one", agent_kind, str(batch), precision, threads, mode, graphs, tf]
                        out_text = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                        results.append(json.loads(out_text.strip().splitlines()[-1]))
                except subprocess.CalledProcessError as err:  # e.g. out of GPU memory: the other settings still run
                    why = (err.stderr or "").strip().splitlines()[-1:] or [f"exit status {err.returncode}"]
                    results.append({"impl": impl, "agent": agent_kind, "batch": batch, "precision": precision,
                                    "teacher_forcing": tf == "on", "compile": None if mode == "none" else mode,
                                    "cuda_graphs": graphs == "1", "error": why[0]})  # fmt: skip
                    print(f"{setting}: failed: {why[0]}", flush=True)
                else:
                    r = results[-1]
                    print(f"{setting}: {r['frames_per_s']:.1f} frames/s, peak {r['peak_memory_gb']:.1f} GB", flush=True)
                write(manifest, load_before, complete=False)
        report = write(manifest, load_before, complete=True)
    print(f"ratio_vs_public {report['ratio_vs_public']}, amp_vs_fp32 {report['amp_vs_fp32']}, "
          f"tf32_vs_fp32 {report['tf32_vs_fp32']}, "
          f"compiled_vs_eager {report['compiled_vs_eager']}, graphs_vs_eager {report['graphs_vs_eager']}, "
          f"free_running_ratio_vs_public {report['free_running_ratio_vs_public']}, "
          f"free_running_vs_teacher_forced {report['free_running_vs_teacher_forced']}; wrote {out}")


if __name__ == "__main__":
    with user_errors():  # a missing or malformed input: one line
        main()
