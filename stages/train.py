"""DVC stage `train`: imitation training of the TC agent or the BC baseline (params: model.*, train.*).

    python stages/train.py --params params.yaml --agent tc --train data/demos/train --val data/demos/val \
        --out models/tc --metrics reports/metrics/train_tc.json --history reports/plots/train_tc.csv

Writes <out>/best.pt (best validation success, then action accuracy) and <out>/last.pt
(resume state), the metrics JSON (numbers only: a DVC metric) and the per-epoch history
CSV (tc.history). An interrupted run started again with the same settings continues from
<out>/last.pt; one started with other settings refuses to, or with --restart-if-changed
(as dvc.yaml runs it) starts afresh. The validation success rate is measured by
tc.evaluate on the seeds demos.val_seed, demos.val_seed + 1, ... (train.val_episodes of
them; fresh for training, which uses demos.seed onwards).

With train.nproc = N > 1 the stage starts itself again in N processes, as
``torchrun --standalone --nproc_per_node N`` would (data-parallel training, see
tc.distributed.launch); started by torchrun (WORLD_SIZE set) it joins the process
group instead (gloo on CPU, nccl and cuda:LOCAL_RANK on CUDA), whatever train.nproc says,
so several machines can run it with torchrun's own --nnodes / --rdzv options. Rank 0
alone writes the outputs and logs to MLflow.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch.distributed as dist

from tc import distributed, tracking
from tc.checkpoint import CheckpointError, check_config, load_checkpoint
from tc.demos import Demos, DemosConfig, load_demos, read_manifest
from tc.device import pick_device
from tc.evaluate import EvaluateConfig, evaluate, summarize
from tc.history import history_csv
from tc.io import check_output, write_json_atomic, write_text_atomic
from tc.model import ModelConfig
from tc.params import ConfigError, UserError, check_seed_ranges, load_configs, user_errors
from tc.provenance import code_digest, record_digest, recorded_digest
from tc.train import TrainConfig, check_resume, train


def can_resume(last: Path, model_cfg: ModelConfig, cfg: TrainConfig, demos: Demos, restart_if_changed: bool,
               other_code: bool, say: bool = True) -> bool:  # fmt: skip
    """Whether to continue from ``last`` (<out>/last.pt).

    A last.pt made with other settings or data is refused (UserError), or, with
    ``restart_if_changed``, replaced by a fresh run: dvc.yaml passes that flag, because
    DVC keeps the persisted last.pt of the previous settings when it reruns the stage for
    new ones (`dvc exp run -S train.sg_coef=1`); with it, a last.pt written by other code
    (``other_code``: its folder's digest is not this code's, tc.provenance) starts afresh too; without it, such a last.pt is resumed with a
    warning (a run by hand after a fix that changes nothing learned). An unreadable last.pt
    is always an error. ``say``: print what is done (with N processes, the first one alone does).
    """
    if not last.exists():
        return False
    try:
        ckpt = load_checkpoint(last)
    except CheckpointError as err:
        raise UserError(f"{err}; delete it or pass --no-resume to start afresh") from None
    if not ckpt.get("train_state"):
        raise UserError(f"{last} holds no training state to resume (a best.pt copied there?); delete it or pass "
                        f"--no-resume to start afresh")
    try:
        check_config(last, ckpt, model_cfg)
        check_resume(last, ckpt["train_state"], cfg, demos)
        if other_code:
            written = f"{last} was written by other code (the stage or a tc module changed since)"
            if restart_if_changed:
                raise ValueError(written)
            if say:
                print(f"warning: {written}; resuming it as asked (--no-resume starts afresh, as dvc repro will)",
                      file=sys.stderr)
    except ValueError as err:
        if not restart_if_changed:
            raise UserError(f"{err}, or pass --no-resume") from None
        if say:
            print(f"starting afresh: {err}")
        return False
    ts = ckpt["train_state"]
    if say:
        print(f"resuming from {last}: its run is finished, nothing left to train" if ts["epoch"] >= cfg.epochs
              else f"resuming from {last} at epoch {ts['epoch'] + 1}, update {ts['updates']}")  # fmt: skip
    return True


def data_settings(args, demos_cfg: DemosConfig, params: dict, warn: bool) -> DemosConfig:
    """``demos_cfg`` as the --train and --val data were made (their manifests; no shard is read).

    Demos of another level are refused. Other settings are taken from the data, with a
    warning when ``warn``: run by hand on other data, MLflow and the validation rollouts
    follow the data, not params.yaml.
    """
    train, val = read_manifest(args.train), read_manifest(args.val)
    for flag, manifest in (("--train", train), ("--val", val)):
        if manifest["level"] != demos_cfg.level:
            raise UserError(f"{flag} holds {manifest['level']} demos, but {args.params} demos.level is "
                            f"{demos_cfg.level}")
    made = {"seed": train["first_seed"], "episodes": train["episodes"], "noise_rate": train["noise_rate"],
            "val_seed": val["first_seed"], "val_episodes": val["episodes"]}  # fmt: skip
    differ = [f"demos.{k} {getattr(demos_cfg, k)!r} vs {v!r}" for k, v in made.items() if getattr(demos_cfg, k) != v]
    if differ and warn:
        print(f"warning: --train/--val were made with other settings than {args.params} says ({'; '.join(differ)}); "
              f"the run records the data's", file=sys.stderr)
    data = replace(demos_cfg, **made)
    try:
        check_seed_ranges([data], params)
    except ConfigError as err:  # a hand run's choice (tests do it), not refused as in params.yaml
        if warn:
            print(f"warning: --val is not held out: {err}", file=sys.stderr)
    return data


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="reads model.*, train.*, demos.*, evaluate.batch_size")
    ap.add_argument("--agent", choices=["tc", "bc"], required=True, help="tc: Thought Cloning; bc: the lower level alone")
    ap.add_argument("--train", default="data/demos/train")
    ap.add_argument("--val", default="data/demos/val")
    ap.add_argument("--out", required=True, help="folder for best.pt and last.pt")
    ap.add_argument("--metrics", required=True)
    ap.add_argument("--history", required=True)
    fresh = ap.add_mutually_exclusive_group()
    fresh.add_argument("--no-resume", action="store_true", help="start afresh even if <out>/last.pt exists")
    fresh.add_argument("--restart-if-changed", action="store_true",
                        help="start afresh when <out>/last.pt was made with other settings or code "
                             "(default: refuse other settings)")
    args = ap.parse_args(argv)

    with user_errors():
        params, c = load_configs(args.params, model=ModelConfig, train=TrainConfig, demos=DemosConfig,
                                 evaluate=EvaluateConfig)  # fmt: skip
        model_cfg, cfg = replace(c.model, use_thoughts=args.agent == "tc"), c.train
        for flag, path in (("--metrics", args.metrics), ("--history", args.history)):
            check_output(path, flag)
        check_output(args.out, "--out", folder=True)
        if cfg.nproc > 1 and "WORLD_SIZE" not in os.environ:
            # The data's errors in one line, before torchrun starts N processes that would each fail.
            data_settings(args, c.demos, params, warn=False)
            distributed.launch(cfg.nproc, __file__, sys.argv[1:] if argv is None else argv)
            return
        distributed.init_from_env(pick_device(cfg.device, key="train.device"))
        rank, world = distributed.rank_and_world()
        demos_cfg = data_settings(args, c.demos, params, warn=rank == 0)
        train_demos, val_demos = load_demos(args.train), load_demos(args.val)
        code = code_digest(__file__)
        other_code = recorded_digest(args.out) != code
        resume = not args.no_resume and can_resume(Path(args.out) / "last.pt", model_cfg, cfg, train_demos,
                                                   args.restart_if_changed, other_code, say=rank == 0)  # fmt: skip
        if world > 1:
            dist.barrier()  # every rank has read the recorded digest before rank 0 replaces it
        # A run resumed over other code's last.pt keeps that code's digest: it is not this code's
        # output, and the next `dvc repro` starts it afresh.
        if rank == 0 and not (resume and other_code):
            record_digest(args.out, code)
        metrics = run(args, model_cfg, cfg, demos_cfg, c.evaluate, train_demos, val_demos, resume, rank)
    if world > 1:
        dist.destroy_process_group()
    if metrics is not None:
        print(f"{args.agent}: best val success {metrics['best_val_success']} (epoch {metrics['best_epoch']}), "
              f"final action acc {metrics['final_action_acc']:.3f}, {metrics['frames']} frames in "
              f"{metrics['wall_time_s']:.0f}s ({world} process{'es' if world > 1 else ''})")  # fmt: skip


def run(args, model_cfg: ModelConfig, cfg: TrainConfig, demos_cfg: DemosConfig, eval_cfg: EvaluateConfig,
        train_demos: Demos, val_demos: Demos, resume: bool, rank: int) -> dict | None:  # fmt: skip
    """Train, then (rank 0) write the metrics, the history and log them; returns the metrics (None off rank 0)."""
    val_seeds = [demos_cfg.val_seed + i for i in range(cfg.val_episodes)]

    def evaluate_fn(agent) -> dict:
        episodes = evaluate(agent, demos_cfg.level, val_seeds, args.agent, batch_size=eval_cfg.batch_size,
                            sample_seed=cfg.seed, progress=False, workers=eval_cfg.workers)  # fmt: skip
        return summarize(episodes)

    # The data's params too: runs on other demos must be told apart by their params, not only by tags.
    run_params = {"model": asdict(model_cfg), "train": asdict(cfg), "demos": asdict(demos_cfg), "agent": args.agent}
    name = f"train-{args.agent}" + (f" sg_coef={cfg.sg_coef:g}" if args.agent == "tc" else "")
    tags = {"stage": "train", "agent": args.agent}
    with tracking.start_run(name, run_params, tags=tags) if rank == 0 else contextlib.nullcontext():
        result = train(model_cfg, cfg, train_demos, val_demos, args.out, evaluate_fn=evaluate_fn if val_seeds else None,
                       log_fn=tracking.metrics_logger() if rank == 0 else None, resume=resume)  # fmt: skip
        if rank != 0:  # the outputs are rank 0's
            return None
        history, best = result["history"], result["best"]
        final = history[-1]
        metrics = {
            "final_val_success": final.get("val_success"),
            "best_val_success": best["val_success"],
            "best_val_success_ci_low": best["val_success_ci_low"],
            "best_val_success_ci_high": best["val_success_ci_high"],
            "val_episodes": best["val_episodes"],
            "best_epoch": best["epoch"],
            "final_action_acc": final.get("val_action_acc"),
            "final_thought_acc": final.get("val_thought_acc"),
            "final_oracle_action_acc": final.get("val_oracle_action_acc"),
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
    return metrics


if __name__ == "__main__":
    main()
