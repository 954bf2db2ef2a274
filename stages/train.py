"""DVC stage `train`: imitation training of the TC agent or the BC baseline (params: model.*, train.*).

    python stages/train.py --params params.yaml --agent tc --train data/demos/train --val data/demos/val \
        --out models/tc --metrics reports/metrics/train_tc.json --history reports/plots/train_tc.csv

Writes <out>/best.pt (best validation success, then action accuracy) and <out>/last.pt
(resume state), the metrics JSON and the per-epoch history CSV. An interrupted run
started again with the same settings continues from <out>/last.pt. The validation
success rate is measured by tc.evaluate on the seeds demos.val_seed, demos.val_seed + 1,
... (train.val_episodes of them; fresh for training, which uses demos.seed onwards).

With train.nproc = N > 1 the stage starts itself again under
``python -m torch.distributed.run --standalone --nproc_per_node N`` (data-parallel
training, see tc.distributed); started by torchrun (WORLD_SIZE set) it joins the process
group instead (gloo on CPU, nccl and cuda:LOCAL_RANK on CUDA), whatever train.nproc says,
so several machines can run it with torchrun's own --nnodes / --rdzv options. Rank 0
alone writes the outputs and logs to MLflow.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch.distributed as dist

from tc import distributed, tracking
from tc.demos import load_demos
from tc.io import write_json_atomic, write_text_atomic
from tc.evaluate import evaluate, summarize
from tc.model import ModelConfig
from tc.params import load_params
from tc.train import TrainConfig, pick_device, train

HISTORY_COLUMNS = ["epoch", "frames", "updates", "lr", "tf_ratio", "loss", "val_success", "action_acc", "thought_acc",
                   "val_loss", "train_action_acc", "train_thought_acc", "wall_time_s"]


def history_csv(history: list[dict]) -> str:
    """CSV text of the per-epoch history; empty cells where an epoch had no validation (or BC has no thoughts)."""
    names = {"loss": "train_loss", "action_acc": "val_action_acc", "thought_acc": "val_thought_acc"}
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(HISTORY_COLUMNS)
    for row in history:
        values = [row.get(names.get(c, c)) for c in HISTORY_COLUMNS]
        writer.writerow(["" if v is None else v for v in values])
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="reads model.*, train.*, demos.level, demos.val_seed, evaluate.batch_size")
    ap.add_argument("--agent", choices=["tc", "bc"], required=True, help="tc: Thought Cloning; bc: the lower level alone")
    ap.add_argument("--train", default="data/demos/train")
    ap.add_argument("--val", default="data/demos/val")
    ap.add_argument("--out", required=True, help="folder for best.pt and last.pt")
    ap.add_argument("--metrics", required=True)
    ap.add_argument("--history", required=True)
    ap.add_argument("--no-resume", action="store_true", help="start afresh even if <out>/last.pt exists")
    args = ap.parse_args()

    params = load_params(args.params, "model", "train", "demos")
    try:
        model_cfg = replace(ModelConfig.from_dict(params["model"]), use_thoughts=args.agent == "tc")
        cfg = TrainConfig.from_dict(params["train"])
    except (TypeError, ValueError) as err:
        raise SystemExit(f"{args.params}: {err}") from None
    if cfg.nproc > 1 and "WORLD_SIZE" not in os.environ:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(cfg.nproc),
               sys.argv[0], *sys.argv[1:]]
        raise SystemExit(subprocess.run(cmd).returncode)
    distributed.init_from_env(pick_device(cfg.device))
    rank, world = distributed.rank_and_world()
    level = params["demos"]["level"]
    train_demos, val_demos = load_demos(args.train), load_demos(args.val)
    for name, demos in (("--train", train_demos), ("--val", val_demos)):
        if demos.manifest["level"] != level:
            raise SystemExit(f"{name} {demos.manifest['level']} demos, but {args.params} demos.level is {level}")

    val_seeds = [params["demos"]["val_seed"] + i for i in range(cfg.val_episodes)]
    eval_batch = (params.get("evaluate") or {}).get("batch_size", 64)

    def evaluate_fn(agent) -> dict:
        episodes = evaluate(agent, level, val_seeds, args.agent, batch_size=eval_batch, sample_seed=cfg.seed, progress=False)
        return summarize(episodes)

    run_params = {"model": asdict(model_cfg), "train": asdict(cfg), "demos": {"level": level}, "agent": args.agent}
    tags = {"stage": "train", "agent": args.agent}
    with tracking.start_run(f"train-{args.agent}", run_params, tags=tags) if rank == 0 else contextlib.nullcontext():
        result = train(model_cfg, cfg, train_demos, val_demos, args.out, evaluate_fn=evaluate_fn if val_seeds else None,
                       log_fn=tracking.metrics_logger() if rank == 0 else None, resume=not args.no_resume)
        if rank != 0:  # the outputs are rank 0's
            dist.destroy_process_group()
            return
        history, best = result["history"], result["best"]
        final = history[-1]
        metrics = {
            "agent": args.agent,
            "final_val_success": final.get("val_success"),
            "best_val_success": best["val_success"],
            "best_epoch": best["epoch"],
            "final_action_acc": final.get("val_action_acc"),
            "final_thought_acc": final.get("val_thought_acc"),
            "best_action_acc": best["val_action_acc"],
            "best_thought_acc": best["val_thought_acc"],
            "frames": result["frames"],
            "updates": result["updates"],
            "epochs": cfg.epochs,
            "wall_time_s": result["wall_time_s"],
            "parameters": result["parameters"],
        }
        write_json_atomic(Path(args.metrics), metrics)
        write_text_atomic(Path(args.history), history_csv(history))
        tracking.log_artifacts([args.metrics, args.history, str(Path(args.out) / "best.pt")])
    if world > 1:
        dist.destroy_process_group()
    print(f"{args.agent}: best val success {metrics['best_val_success']} (epoch {metrics['best_epoch']}), "
          f"final action acc {metrics['final_action_acc']:.3f}, {metrics['frames']} frames in {metrics['wall_time_s']:.0f}s "
          f"({world} process{'es' if world > 1 else ''})")


if __name__ == "__main__":
    main()
