"""DVC stage: thought-annotated bot demos for training and validation (params: demos.*).

    python stages/generate_demos.py --params params.yaml --train-out data/demos/train --val-out data/demos/val

Finished shards are kept: a killed run continues where it stopped (dvc.yaml marks the
folders `persist`, so `dvc repro` keeps them too). A folder holding demos of other
settings is refused, or with --restart-if-changed (as dvc.yaml runs it) emptied first,
as is one made by other code (tc.provenance).
Several machines: machine i of N runs --shard i/N; the shard files and config.json of
every machine are copied into one folder per split, then --merge writes the manifests.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from functools import partial
from pathlib import Path

from tc.demos import DemosConfig, SettingsMismatch, generate_demos, write_manifest
from tc.io import check_output
from tc.params import UserError, load_configs, user_errors
from tc.provenance import code_digest, record_digest, recorded_digest


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` -> (i, N) with 0 <= i < N."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise UserError(f"--shard {text}: expected i/N with 0 <= i < N (machine i of N), e.g. --shard 0/4")
    return int(m.group(1)), int(m.group(2))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--train-out", default="data/demos/train")
    ap.add_argument("--val-out", default="data/demos/val")
    ap.add_argument("--shard", help="i/N: make only shards k with k %% N == i (one machine of N), no manifest")
    ap.add_argument("--merge", action="store_true", help="write the manifests once all shards are present")
    ap.add_argument("--restart-if-changed", action="store_true",
                    help="empty an output folder of other settings or code instead of refusing other settings")
    args = ap.parse_args(argv)

    with user_errors():
        _, c = load_configs(args.params, demos=DemosConfig)
        p = c.demos
        check_output(args.train_out, "--train-out", folder=True)
        check_output(args.val_out, "--val-out", folder=True)
        train_out, val_out = Path(args.train_out).resolve(), Path(args.val_out).resolve()
        if train_out.is_relative_to(val_out) or val_out.is_relative_to(train_out):  # emptying one would empty both
            raise UserError(f"--train-out {args.train_out} and --val-out {args.val_out}: one folder holds the other; "
                            f"the splits need a folder each")
        shards = parse_shard(args.shard) if args.shard else None
        splits = [(args.train_out, p.seed, p.episodes), (args.val_out, p.val_seed, p.val_episodes)]
        for out, first_seed, episodes in splits:
            manifest = merge(out) if args.merge else generate(p, out, first_seed, episodes, shards,
                                                              args.restart_if_changed, code_digest(__file__))
            if manifest:
                print(f"{out}: {manifest['num_episodes']} episodes, {manifest['num_steps']} steps, "
                      f"{manifest['num_failed']} bot failures, mean length {manifest['length_stats']['mean']:.1f}")


def generate(p: DemosConfig, out: str, first_seed: int, episodes: int, shards: tuple[int, int] | None,
             restart_if_changed: bool, code: str) -> dict | None:  # fmt: skip
    """One split into ``out`` (see tc.demos.generate_demos), keeping its finished shards.

    With ``restart_if_changed``, a folder of other settings or written by other code
    (``code``: tc.provenance) is emptied first; without, other settings are refused and
    other code's shards are continued with a warning, keeping that code's digest: the folder
    is not this code's output, and the next `dvc repro` starts it afresh.
    """
    make = partial(generate_demos, p.level, first_seed, episodes, out, noise_rate=p.noise_rate, workers=p.workers,
                   shard_size=p.shard_size, shards=shards, bot=p.bot)  # fmt: skip
    other_code = any(Path(out).glob("shard-*.npz")) and recorded_digest(out) != code
    if other_code and not restart_if_changed:
        print(f"warning: {out} holds demos made by other code (the stage or a tc module changed since); "
              f"continuing them as asked (delete the folder to start afresh, as dvc repro will)", file=sys.stderr)
    else:
        if other_code:
            print(f"starting {out} afresh: its demos were made by other code (the stage or a tc module changed since)")
            shutil.rmtree(out)
        record_digest(out, code)
    try:
        return make()
    except SettingsMismatch as err:
        if not restart_if_changed:
            raise
        print(f"starting {out} afresh: {err}")
    shutil.rmtree(out)
    record_digest(out, code)
    return make()


def merge(out: str) -> dict:
    """The manifest of ``out`` once every machine's shards (and config.json) were copied into it."""
    if not (Path(out) / "config.json").is_file():
        raise UserError(f"--merge: {out} has no config.json, so no shard was generated there; run "
                        f"--shard i/N on each machine and copy the shard-*.npz files and config.json into {out}")
    return write_manifest(out)


if __name__ == "__main__":
    main()
