"""DVC stage: thought-annotated bot demos for training and validation (params: demos.*)."""

import argparse

from tc.demos import generate_demos, write_manifest
from tc.params import load_params, require


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--train-out", default="data/demos/train")
    ap.add_argument("--val-out", default="data/demos/val")
    ap.add_argument("--shard", help="i/N: make only shards k with k %% N == i (one machine of N), no manifest")
    ap.add_argument("--merge", action="store_true", help="write the manifests once all shards are present")
    args = ap.parse_args()
    p = require(load_params(args.params, "demos")["demos"], "demos", {
        "level": str, "episodes": int, "val_episodes": int, "noise_rate": float,
        "seed": int, "val_seed": int, "shard_size": int, "workers": int, "bot": str,
    })
    shards = None
    if args.shard:
        i, n = (int(x) for x in args.shard.split("/"))
        if not 0 <= i < n:
            raise SystemExit(f"--shard {args.shard}: expected i/N with 0 <= i < N")
        shards = (i, n)
    splits = [(args.train_out, p["seed"], p["episodes"]), (args.val_out, p["val_seed"], p["val_episodes"])]
    for out, first_seed, episodes in splits:
        if args.merge:
            manifest = write_manifest(out)
        else:
            # replace_changed: DVC keeps this output between runs (persist) so that an
            # interrupted run resumes; demos of other settings or versions are regenerated.
            manifest = generate_demos(p["level"], first_seed, episodes, out, noise_rate=p["noise_rate"],
                                      workers=p["workers"], shard_size=p["shard_size"], shards=shards,
                                      bot=p["bot"], replace_changed=True)
        if manifest:
            print(f"{out}: {manifest['num_episodes']} episodes, {manifest['num_steps']} steps, "
                  f"{manifest['num_failed']} bot failures, mean length {manifest['length_stats']['mean']:.1f}")


if __name__ == "__main__":
    main()
