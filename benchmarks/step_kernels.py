"""Kernels, compute and saved memory per time step of a training chunk: what bounds training on a GPU, counted on
any device.

    python benchmarks/step_kernels.py [--rows 16] [--small]

On a GPU the step loop is bound by launching kernels (an H100 profile of a paper-size
update: the GPU busy 14% of the time), and each operator that computes something is at
least one launch; inside a CUDA graph each is still a node of a few microseconds. So this
counts, for one time step of a training chunk (forward and backward; the difference
between chunks of 8 and 4 steps, so that per-chunk work drops out), the aten operators
dispatched other than views, the matmul and convolution FLOPs per frame (``FlopCounterMode``:
what tensor cores would run, in TF32 or bfloat16, once graphs take the launches away), with the
thought words the teacher-forced decoder runs per frame (each ~3 x 2 x memory x 4 memory FLOPs,
forward and backward), and the bytes autograd keeps for the backward pass per frame
(the activation memory of a chunk: rows x ``recurrence`` frames of it). Agents: TC
teacher-forced, TC free-running, BC; layouts: the shrinking time-major one (eager
training) and the padded one (``train.cuda_graphs``). Also one evaluation step
(``Agent.act``) of TC and BC, eager and on the fixed-shape path of CUDA graphs. Paper size
(image 128, memory 2048, instr 256) unless ``--small``; BossLevel episodes of at least 8 steps. Counts are of
the CPU's operators: where a CPU kernel is a composite (the GRU that encodes generated
thoughts), CUDA runs fewer, larger ones (cuDNN). Writes
benchmarks/results/step_kernels_<device>.json.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from tc.demos import generate_demos, load_demos
from tc.io import write_json_atomic
from tc.model import Agent, ModelConfig
from tc.params import user_errors
from tc.train import Padding, TrainConfig, chunk_terms, loss_scale, make_batch, objective
from tc.vocab import PAD
from train_throughput import PAPER_MODEL  # a sibling script: the same paper size

ROOT = Path(__file__).resolve().parents[1]
SMALL_MODEL = {"image_dim": 16, "memory_dim": 32, "instr_dim": 16}
# Operators that only make a new view of existing memory (no kernel on any device).
VIEWS = {"view", "_unsafe_view", "reshape", "unsqueeze", "squeeze", "t", "transpose", "permute", "expand", "slice",
         "select", "split", "unsafe_split", "split_with_sizes", "alias", "as_strided", "detach", "promote_types"}
CASES = {"tc_teacher_forced": (True, True), "tc_free_running": (True, False), "bc": (False, True)}


class Operators(TorchDispatchMode):
    """Counts the non-view aten operators dispatched, by name."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in VIEWS and not (name == "dropout" and not args[2]):  # eval-mode dropout returns its input
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def chunk(agent: Agent, demos, episodes: np.ndarray, steps: int, padded: bool,
          true_thoughts: bool) -> tuple[Counter, int, int, int]:  # fmt: skip
    """(operators, bytes saved for backward, matmul and convolution FLOPs, thought words the teacher-forced
    decoder runs) of the first chunk of ``steps`` steps of a batch, forward and backward."""
    cfg = TrainConfig(batch_size=len(episodes), recurrence=steps)
    batch = make_batch(demos, episodes, torch.device("cpu"), padding=Padding.of(demos, cfg) if padded else None)
    sizes, rows = next(batch.chunks(steps))
    assert len(sizes) == steps and min(sizes) == len(episodes), "every episode must last the whole chunk"
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:  # a tensor saved by several operators counts once
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    agent.zero_grad()
    flops = FlopCounterMode(display=False)
    with Operators() as ops, flops, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        terms, _ = chunk_terms(agent, batch.images[rows], sizes, batch.missions, agent.initial_state(len(episodes)),
                               batch.actions[rows], batch.thoughts[rows],
                               None if batch.valid is None else batch.valid[rows], true_thoughts, False)  # fmt: skip
        objective(terms, cfg, loss_scale(demos, cfg)).backward()
    thoughts = batch.thoughts[rows] if batch.valid is None else batch.thoughts[rows][batch.valid[rows]]
    words = 0 if agent.upper is None else int((thoughts != PAD).sum())  # the decoder runs the real rows' words
    return ops.counts, sum(storages.values()), flops.get_total_flops(), words


@torch.inference_mode()
def act(agent: Agent, demos, episodes: np.ndarray, fixed: bool) -> Counter:
    """Operators of one evaluation step (``Agent.act``, as tc.evaluate runs it) on the first frames of ``episodes``."""
    rows = demos.offsets[episodes]
    enc = agent.encode_mission(torch.from_numpy(demos.missions[episodes]).long(), fixed)
    state = agent.initial_state(len(episodes))
    with Operators() as ops:
        agent.act(torch.from_numpy(demos.images[rows]), None, enc, state, fixed=fixed)
    return ops.counts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16, help="episodes per step (default 16)")
    ap.add_argument("--small", action="store_true", help="a tiny model instead of the paper's (a quick check)")
    ap.add_argument("--out", help="default: benchmarks/results/step_kernels_cpu.json")
    args = ap.parse_args(argv)
    dims = SMALL_MODEL if args.small else PAPER_MODEL
    with tempfile.TemporaryDirectory() as tmp:
        generate_demos("BabyAI-BossLevel-v0", 0, 2 * args.rows + 8, tmp, progress=False)
        demos = load_demos(tmp)
    lengths = np.diff(demos.offsets)
    episodes = np.flatnonzero(lengths >= 8)[: args.rows]
    if len(episodes) < args.rows:
        raise SystemExit(f"--rows {args.rows}: only {len(episodes)} generated episodes last 8 steps")
    results = {}
    for case, (use_thoughts, true_thoughts) in CASES.items():
        torch.manual_seed(0)
        agent = Agent(ModelConfig(**dims, use_thoughts=use_thoughts)).train()
        for layout, padded in (("shrinking", False), ("padded", True)):
            (ops4, saved4, flops4, words4), (ops8, saved8, flops8, words8) = (
                chunk(agent, demos, episodes, s, padded, true_thoughts) for s in (4, 8))
            per_step = Counter({k: (ops8[k] - ops4[k]) / 4 for k in ops8 if ops8[k] != ops4[k]})
            frames = 4 * args.rows
            results[f"{case}_{layout}"] = {
                "operators_per_step": sum(per_step.values()),
                "flops_per_frame": (flops8 - flops4) / frames,
                "decoder_words_per_frame": (words8 - words4) / frames,
                "saved_bytes_per_frame": (saved8 - saved4) / frames,
                "top_operators": dict(per_step.most_common(12)),
            }
            print(f"{case:18} {layout:9} {sum(per_step.values()):7.1f} operators/step "
                  f"{(flops8 - flops4) / frames / 1e9:6.2f} GFLOP/frame ({(words8 - words4) / frames:.2f} decoded words) "
                  f"{(saved8 - saved4) / frames / 1e6:8.3f} MB saved/frame", flush=True)
    for kind, use_thoughts in (("tc", True), ("bc", False)):
        torch.manual_seed(0)
        agent = Agent(ModelConfig(**dims, use_thoughts=use_thoughts)).eval()
        for layout, fixed in (("eager", False), ("fixed", True)):
            ops = act(agent, demos, episodes, fixed)
            results[f"act_{kind}_{layout}"] = {"operators_per_step": sum(ops.values()),
                                              "top_operators": dict(ops.most_common(12))}
            print(f"act {kind:14} {layout:9} {sum(ops.values()):7.1f} operators/step", flush=True)
    out = Path(args.out) if args.out else ROOT / "benchmarks/results/step_kernels_cpu.json"
    write_json_atomic(out, {
        "benchmark": "step_kernels", "device": f"cpu: {platform.machine()}", "torch": torch.__version__,
        "model": dims, "rows": args.rows,
        "what": "per time step of a training chunk, forward + backward: non-view aten operators (each >= 1 CUDA "
                "kernel launch), matmul and convolution FLOPs per frame (padded: per row, real or not), the thought "
                "words per frame the teacher-forced decoder runs, and bytes autograd saves for the backward pass per "
                "frame; act_*: the operators of "
                "one evaluation step (eager: thoughts decoded until every row's <eos>, here an untrained model's "
                "16-word cap; fixed: the CUDA-graph path, always 16 words)",
        "results": results,
    })
    print(f"wrote {out}")


if __name__ == "__main__":
    with user_errors():  # a missing or malformed input: one line
        main()
