"""Thought-annotated expert demonstrations: generation, storage and loading.

A dataset is a directory of compressed ``.npz`` shards plus ``manifest.json``. Episode i
of a dataset uses seed ``first_seed + i``; shard k holds episodes
``[k * shard_size, (k + 1) * shard_size)``. Shards are written atomically and are
deterministic (fixed zip timestamps), so the same seeds give byte-identical shards
whatever the number of workers, and an interrupted run resumes from finished shards.
The manifest is written last: a dataset without one is incomplete.
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
from collections.abc import Mapping
from pathlib import Path

import minigrid
import numpy as np
from tqdm import tqdm

import tc
from tc import fastobs, vocab
from tc.envs import ACTION_NAMES, check_env_id, make_env, reset_quiet
from tc.io import atomic_path, write_json_atomic
from tc.params import UserError, check_fields, ordered_map, param
from tc.thoughts import BOTS, THOUGHTS_VERSION, make_bot, random_thought

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Noise actions: left, right, forward (SPEC).
NOISE_ACTIONS = np.array([0, 1, 2])
STEP_ARRAYS = ("images", "directions", "actions", "thoughts", "noise")
SHARD_ARRAYS = STEP_ARRAYS + ("lengths", "missions", "seeds", "failed_seeds", "failed_reasons")


@dataclasses.dataclass(frozen=True)
class DemosConfig:
    """The ``demos:`` section of params.yaml."""

    level: str = param("BabyAI-MiniBossLevel-v0")  # a registered BabyAI id (paper: BabyAI-BossLevel-v0)
    episodes: int = param(500, ge=1)  # training episodes
    val_episodes: int = param(30, ge=1)  # validation demos (fresh seeds)
    noise_rate: float = param(0.01, ge=0, lt=1)  # chance per step that a noise segment starts
    seed: int = param(0, ge=0)  # first training seed; episode i uses seed + i
    val_seed: int = param(100_000_000, ge=0)  # first validation seed
    shard_size: int = param(250, ge=1)  # episodes per .npz shard
    workers: int = param(2, ge=1, speed=True)  # processes; the data do not depend on it
    # The expert playing the demos: fast (tc/fastbot.py) or minigrid's bot (the reference); the same data.
    bot: str = param("fast", choices=("minigrid", "fast"), speed=True)

    def __post_init__(self):
        check_fields(self, "demos")
        try:
            check_env_id(self.level)
        except ValueError as err:
            raise ValueError(f"demos.level: {err}") from None

    def seed_ranges(self, params: Mapping) -> dict[str, tuple[str, range]]:
        """The levels the demos are played on, by role (kept apart by tc.params.load_configs).

        Validation also covers training's rollouts (train.val_episodes of ``params``, from
        val_seed): they choose the kept checkpoint too.
        """
        rollouts = (params.get("train") or {}).get("val_episodes", 0)
        val = max(self.val_episodes, rollouts if type(rollouts) is int else 0)  # a bad value is TrainConfig's error
        return {"demos.seed": ("training", range(self.seed, self.seed + self.episodes)),
                "demos.val_seed": ("validation", range(self.val_seed, self.val_seed + val))}


class DatasetError(UserError, RuntimeError):
    """A dataset on disk is missing, incomplete or corrupt."""


class SettingsMismatch(DatasetError):
    """A dataset folder holds demos made with other settings."""


@dataclasses.dataclass
class Episode:
    seed: int
    mission: str
    images: np.ndarray      # uint8 [T, 7, 7, 3]
    directions: np.ndarray  # uint8 [T]
    actions: np.ndarray     # uint8 [T]
    thoughts: list[str]     # [T]
    noise: np.ndarray       # uint8 [T]: 0 bot step, 1 first step of a noise segment, 2 later noise steps


@dataclasses.dataclass
class Demos:
    """A dataset loaded into flat arrays (see docs/ARCHITECTURE.md)."""

    images: np.ndarray      # uint8 [S, 7, 7, 3]
    directions: np.ndarray  # uint8 [S]
    actions: np.ndarray     # uint8 [S]
    thoughts: np.ndarray    # uint8 [S, MAX_THOUGHT_LEN]
    noise: np.ndarray       # uint8 [S]: 0 bot step, 1 first step of a noise segment, 2 later noise steps
    offsets: np.ndarray     # int64 [E + 1]
    missions: np.ndarray    # uint8 [E, M]
    seeds: np.ndarray       # int64 [E]
    manifest: dict

    @property
    def num_episodes(self) -> int:
        return len(self.seeds)

    @property
    def num_steps(self) -> int:
        return len(self.actions)


# -- one episode ------------------------------------------------------------------------


def run_episode(level: str, seed: int, noise_rate: float, bot: str = "minigrid") -> Episode:
    """Run the bot with thoughts (and noise segments) on ``level`` with ``seed``.

    ``bot``: "minigrid", "fast" (the same episode, faster: tc.fastbot, tc.fastobs) or
    "check" (both, raising tc.thoughts.BotMismatch at the first step where they, or the
    two observations, differ). Raises RuntimeError
    if the bot crashes or the episode does not end in success.
    """
    env = make_env(level)
    if bot != "minigrid":  # the fast path computes the observations too
        fastobs.install(env, check=bot == "check")
    obs = reset_quiet(env, seed)
    expert = make_bot(env, bot)
    # The noise stream is seeded by the episode seed alone, so data never depend on workers.
    rng = np.random.default_rng([seed, 0x7C])
    images, directions, actions, thoughts, noise = [], [], [], [], []
    noise_left, noise_thought = 0, ""
    last_action = None
    mission = obs["mission"]
    while True:
        action, thought = expert.step(last_action, obs["image"])
        noise_step = 0
        if noise_left == 0 and noise_rate > 0 and rng.random() < noise_rate:
            noise_left = int(rng.integers(1, 6))
            noise_thought = random_thought(rng)
            noise_step = 1
        if noise_left > 0:
            noise_step = noise_step or 2
            action, thought = int(rng.choice(NOISE_ACTIONS)), noise_thought
            noise_left -= 1
        images.append(obs["image"])
        directions.append(obs["direction"])
        actions.append(action)
        thoughts.append(thought)
        noise.append(noise_step)
        obs, reward, terminated, truncated, _ = env.step(action)
        last_action = action
        if terminated or truncated:
            break
    if not (terminated and reward > 0):
        raise RuntimeError(f"bot did not succeed ({len(actions)} steps)")
    return Episode(
        seed=seed,
        mission=mission,
        images=np.asarray(images, dtype=np.uint8),
        directions=np.asarray(directions, dtype=np.uint8),
        actions=np.asarray(actions, dtype=np.uint8),
        thoughts=thoughts,
        noise=np.asarray(noise, dtype=np.uint8),
    )


def _episode_or_failure(args: tuple[str, int, float, str]) -> Episode | tuple[int, str]:
    try:
        return run_episode(*args)
    except Exception as err:  # the bot's assertions and errors count as failures of that seed
        return args[1], f"{type(err).__name__}: {err}"


# -- shards ---------------------------------------------------------------------------


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write a compressed npz atomically and byte-reproducibly (fixed zip timestamps)."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)


def _shard_arrays(results: list[Episode | tuple[int, str]]) -> dict[str, np.ndarray]:
    episodes = [r for r in results if isinstance(r, Episode)]
    failures = [r for r in results if not isinstance(r, Episode)]
    thoughts = [t for ep in episodes for t in ep.thoughts]
    distinct = sorted(set(thoughts))  # encode each distinct thought once
    index = {t: i for i, t in enumerate(distinct)}
    thought_ids = vocab.encode_padded(distinct, vocab.MAX_THOUGHT_LEN, eos=True)
    return {
        "images": np.concatenate([ep.images for ep in episodes]) if episodes else np.zeros((0, 7, 7, 3), np.uint8),
        "directions": np.concatenate([ep.directions for ep in episodes]) if episodes else np.zeros(0, np.uint8),
        "actions": np.concatenate([ep.actions for ep in episodes]) if episodes else np.zeros(0, np.uint8),
        "noise": np.concatenate([ep.noise for ep in episodes]) if episodes else np.zeros(0, np.uint8),
        "thoughts": thought_ids[[index[t] for t in thoughts]].reshape(-1, vocab.MAX_THOUGHT_LEN),
        "lengths": np.array([len(ep.actions) for ep in episodes], dtype=np.int64),
        "missions": vocab.encode_padded([ep.mission for ep in episodes]),
        "seeds": np.array([ep.seed for ep in episodes], dtype=np.int64),
        "failed_seeds": np.array([seed for seed, _ in failures], dtype=np.int64),
        "failed_reasons": np.array([reason for _, reason in failures], dtype=np.str_),
    }


def read_shard(path: Path) -> dict[str, np.ndarray]:
    """Load and check one shard; any corruption raises DatasetError naming the file."""
    try:  # the file opened here, not by np.load, which leaves it open when the zip is unreadable
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
            arrays = {name: z[name] for name in SHARD_ARRAYS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise DatasetError(f"corrupt or truncated shard {path}: {type(err).__name__}: {err}") from err
    steps = int(arrays["lengths"].sum())
    problems = [f"{n} has {len(arrays[n])} rows, lengths sum to {steps}" for n in STEP_ARRAYS if len(arrays[n]) != steps]
    if not (len(arrays["lengths"]) == len(arrays["seeds"]) == len(arrays["missions"])):
        problems.append("lengths, seeds and missions disagree on the number of episodes")
    if problems:
        raise DatasetError(f"inconsistent shard {path}: " + "; ".join(problems))
    return arrays


def shard_path(out_dir: Path, k: int) -> Path:
    return Path(out_dir) / f"shard-{k:05d}.npz"


# -- generation -------------------------------------------------------------------------


def generate_demos(
    level: str,
    first_seed: int,
    episodes: int,
    out_dir: str | Path,
    noise_rate: float = 0.01,
    workers: int = 1,
    shard_size: int = 500,
    shards: tuple[int, int] | None = None,
    progress: bool = True,
    bot: str = "minigrid",
) -> dict | None:
    """Generate ``episodes`` thought-annotated bot episodes of ``level`` into ``out_dir``.

    Shards already on disk and made with the same settings and data versions are kept (resume).
    ``shards=(i, n)`` generates only the shards k with k % n == i (one machine of n) and
    writes no manifest; run ``write_manifest`` once all shards are present. ``bot``:
    "minigrid" (the reference) or "fast" (tc.fastbot, the same data faster). A directory
    made with other settings or versions is refused (SettingsMismatch; the stage may empty
    it and start afresh). Returns the manifest (None for a partial run).
    """
    check_env_id(level)
    if episodes <= 0 or shard_size <= 0 or workers <= 0:
        raise ValueError(f"episodes, shard_size and workers must be positive, got {episodes}, {shard_size}, {workers}")
    if not 0.0 <= noise_rate < 1.0:
        raise ValueError(f"noise_rate must be in [0, 1), got {noise_rate}")
    if bot not in BOTS:
        raise ValueError(f"bot must be one of {', '.join(BOTS)}, got {bot!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The bot is not part of the settings: both bots make the same data. The versions are:
    # shards of another format, vocabulary, thoughts or minigrid are stale.
    config = {"level": level, "first_seed": first_seed, "episodes": episodes, "noise_rate": noise_rate,
              "shard_size": shard_size, "format_version": FORMAT_VERSION, "vocab_version": vocab.VOCAB_VERSION,
              "thoughts_version": THOUGHTS_VERSION, "minigrid_version": minigrid.__version__}
    _check_same_config(out_dir, config)
    num_shards = -(-episodes // shard_size)
    mine = [k for k in range(num_shards) if shards is None or k % shards[1] == shards[0]]
    todo = []
    for k in mine:
        path = shard_path(out_dir, k)
        # A write cut short leaves only a temp file (tc.io): never a shard, so remove it.
        for tmp in out_dir.glob(f".{path.stem}.*.tmp.npz"):
            tmp.unlink()
        if path.exists():
            try:
                read_shard(path)
                continue
            except DatasetError:
                path.unlink()  # a damaged leftover is regenerated, never trusted
        todo.append(k)
    bounds = {k: (first_seed + k * shard_size, first_seed + min((k + 1) * shard_size, episodes)) for k in todo}
    # All episodes of all pending shards flow through one pool, in seed order, so no worker
    # waits for a shard's slowest episode; a shard is written once its last episode is in.
    tasks = ((level, seed, noise_rate, bot) for lo, hi in bounds.values() for seed in range(lo, hi))
    total = sum(hi - lo for lo, hi in bounds.values())
    try:  # the bar after the fork: tqdm starts a thread, and a process should not fork with threads running
        with ordered_map(_episode_or_failure, tasks, workers, chunksize=4) as results, \
                tqdm(total=total, desc=f"demos {level}", unit="ep", disable=not progress) as bar:  # fmt: skip
            for k, (lo, hi) in bounds.items():
                shard = []
                for _ in range(hi - lo):
                    shard.append(next(results))
                    bar.update(1)
                _write_npz(shard_path(out_dir, k), _shard_arrays(shard))
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: what is kept (tc.params.user_errors says it)
        done = sum(shard_path(out_dir, k).exists() for k in mine)
        err.add_note(f"{done} of the {len(mine)} shards of {out_dir} are written; the same command makes the rest")
        raise
    if shards is not None and len(mine) < num_shards:
        return None
    return write_manifest(out_dir, config)


def _check_same_config(out_dir: Path, config: dict) -> None:
    """Refuse to resume into a directory made with other settings or versions (that would mix data)."""
    marker = out_dir / "config.json"
    if marker.exists():
        old = json.loads(marker.read_text())
        if old != config:
            changed = ", ".join(f"{k} {old.get(k)} -> {config.get(k)}" for k in sorted({*old, *config})
                                if old.get(k) != config.get(k))
            raise SettingsMismatch(f"{out_dir} holds demos made with other settings ({changed}): use a fresh directory")
    else:
        write_json_atomic(marker, config)


def write_manifest(out_dir: str | Path, config: dict | None = None) -> dict:
    """Check every shard of ``out_dir`` and write ``manifest.json`` summarising them."""
    out_dir = Path(out_dir)
    if config is None:
        config = json.loads((out_dir / "config.json").read_text())
    num_shards = -(-config["episodes"] // config["shard_size"])
    missing = [str(shard_path(out_dir, k)) for k in range(num_shards) if not shard_path(out_dir, k).exists()]
    if missing:
        raise DatasetError(f"cannot write the manifest of {out_dir}: {len(missing)} shard(s) missing, e.g. {missing[0]}")
    lengths, failed, thought_counts = [], {}, {}
    for k in range(num_shards):
        arrays = read_shard(shard_path(out_dir, k))
        lengths.append(arrays["lengths"])
        failed.update({str(s): str(r) for s, r in zip(arrays["failed_seeds"], arrays["failed_reasons"])})
        rows, counts = np.unique(arrays["thoughts"], axis=0, return_counts=True)
        for row, c in zip(rows, counts):
            text = vocab.decode(row)
            thought_counts[text] = thought_counts.get(text, 0) + int(c)
    lengths = np.concatenate(lengths)
    manifest = {
        **config,
        "code_version": tc.__version__,
        "vocab": vocab.WORDS,
        "shards": [shard_path(out_dir, k).name for k in range(num_shards)],
        "num_episodes": int(len(lengths)),
        "num_steps": int(lengths.sum()),
        "num_failed": len(failed),
        "failed_seeds": failed,
        "length_stats": {
            "mean": float(lengths.mean()) if len(lengths) else 0.0,
            "min": int(lengths.min()) if len(lengths) else 0,
            "max": int(lengths.max()) if len(lengths) else 0,
            "median": float(np.median(lengths)) if len(lengths) else 0.0,
        },
        "num_distinct_thoughts": len(thought_counts),
    }
    write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest


# -- loading ----------------------------------------------------------------------------


def read_manifest(path: str | Path) -> dict:
    """The manifest of the dataset directory ``path``, checked to be one this code reads (no shard is read)."""
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.exists():
        raise DatasetError(f"{manifest_path} not found: {path} is not a dataset or its generation did not finish")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise DatasetError(f"corrupt manifest {manifest_path}: {err}") from err
    keys = ("level", "first_seed", "episodes", "noise_rate", "shards", "num_episodes", "num_steps")
    if missing := [k for k in keys if not isinstance(manifest, dict) or k not in manifest]:
        raise DatasetError(f"{manifest_path} is not a dataset manifest (no {', '.join(missing)}): regenerate it")
    if manifest.get("vocab_version") != vocab.VOCAB_VERSION or manifest.get("format_version") != FORMAT_VERSION:
        raise DatasetError(
            f"{manifest_path}: format {manifest.get('format_version')} / vocabulary {manifest.get('vocab_version')}, "
            f"this code reads format {FORMAT_VERSION} / vocabulary {vocab.VOCAB_VERSION}: regenerate the dataset"
        )
    return manifest


def load_demos(path: str | Path) -> Demos:
    """Load a complete dataset directory into flat arrays, checking every shard."""
    path = Path(path)
    manifest = read_manifest(path)
    shards = [read_shard(path / name) for name in manifest["shards"]]
    lengths = np.concatenate([s["lengths"] for s in shards])
    if len(lengths) != manifest["num_episodes"] or int(lengths.sum()) != manifest["num_steps"]:
        raise DatasetError(f"{path}: shards hold {len(lengths)} episodes / {lengths.sum()} steps, manifest says "
                           f"{manifest['num_episodes']} / {manifest['num_steps']}")
    width = max(s["missions"].shape[1] for s in shards)
    missions = np.concatenate([np.pad(s["missions"], ((0, 0), (0, width - s["missions"].shape[1]))) for s in shards])
    return Demos(
        **{name: np.concatenate([s[name] for s in shards]) for name in STEP_ARRAYS},
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        missions=missions,
        seeds=np.concatenate([s["seeds"] for s in shards]),
        manifest=manifest,
    )


# -- inspection and checks ---------------------------------------------------------------


def episode_slice(demos: Demos, e: int) -> slice:
    if not 0 <= e < demos.num_episodes:
        raise IndexError(f"episode {e} out of range: the dataset has {demos.num_episodes} episodes")
    return slice(int(demos.offsets[e]), int(demos.offsets[e + 1]))


def format_episode(demos: Demos, e: int) -> str:
    """Episode ``e`` as text: its mission, then one line per run of steps with the same thought."""
    s = episode_slice(demos, e)
    thoughts = [vocab.decode(row) for row in demos.thoughts[s]]
    actions = demos.actions[s]
    lines = [f"episode {e} seed {demos.seeds[e]}: {vocab.decode(demos.missions[e])}"]
    start = 0
    for t in range(1, len(thoughts) + 1):
        if t == len(thoughts) or thoughts[t] != thoughts[start]:
            names = ", ".join(ACTION_NAMES[a] for a in actions[start:t])
            span = f"t={start}" if t - start == 1 else f"t={start}-{t - 1}"
            lines.append(f"{span}: {thoughts[start]}  actions [{names}]")
            start = t
    return "\n".join(lines)


def replay_episode(demos: Demos, e: int) -> tuple[bool, bool]:
    """Re-run episode ``e``'s actions from its seed.

    Returns (observations match the recorded ones, the episode ends in success).
    """
    s = episode_slice(demos, e)
    env = make_env(demos.manifest["level"])
    obs = reset_quiet(env, int(demos.seeds[e]))
    same, success = True, False
    for t, action in enumerate(demos.actions[s]):
        idx = s.start + t
        same &= np.array_equal(obs["image"], demos.images[idx]) and obs["direction"] == demos.directions[idx]
        obs, reward, terminated, truncated, _ = env.step(int(action))
        if terminated or truncated:
            success = terminated and reward > 0 and t == len(demos.actions[s]) - 1
            break
    return bool(same), bool(success)
