"""Out-of-distribution level sets: seeds of a level (paper: BossLevel) binned by behavioural and cognitive difficulty.

Behavioural difficulty of a seed: the number of steps the expert bot needs to solve it
(minigrid's BabyAIBot, whose plan tc.thoughts.ThoughtBot follows; no noise), run as
tc.fastbot.FastBot: the same decisions, ~3x faster, so that rare bins fill in seconds.
Bins are centred on evenly spaced values (25, 75, ..., 425); bin b holds lengths in
[b - w/2, b + w/2) with w the spacing, and the last bin is open-ended (425: >= 400).

Cognitive difficulty of a seed: how much the mission asks the agent to keep in mind,
counted on the mission's instruction tree (minigrid's verifier objects):

    difficulty = number of object descriptions + number of sequencing connectives

An action clause (go to / open / pick up X) has one object description, "put X next to
Y" has two; each "and", ", then" or "after you" joining two clauses adds one. "go to the
red ball" is 1; "put a ball next to the key and open a door" is 2 + 1 + 1 = 4; BossLevel
missions reach 11. Values above the top level (9) count as the top level ("9 or more").
On BossLevel (1,000 seeds) ~75% of missions score 1-4 (the bulk of the training data) and
~1% score 9 or more.

A level set is JSON: for each axis, the list of seeds per bin (``episodes_per_bin`` each,
from the first seeds found scanning upward from ``first_seed``); bins that could not be
filled within ``max_candidates`` seeds are listed under ``unfilled``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from minigrid.envs.babyai.core.verifier import PutNextInstr, SeqInstr
from tqdm import tqdm

from tc.envs import check_env_id, make_env, reset_quiet
from tc.fastbot import FastBot
from tc.journal import Journal
from tc.params import FileFormatError, check_fields, ordered_map, param

AXES = ("behavioural", "cognitive")


def mission_difficulty(instr) -> int:
    """Object descriptions + sequencing connectives of an instruction tree (uncapped)."""
    if isinstance(instr, SeqInstr):
        return mission_difficulty(instr.instr_a) + mission_difficulty(instr.instr_b) + 1
    return 2 if isinstance(instr, PutNextInstr) else 1


def cognitive_level(difficulty: int, levels: list[int]) -> int:
    """The level of a difficulty: itself, or the top level when above it."""
    return min(difficulty, levels[-1])


def behavioural_bin(length: int, bins: list[int]) -> int | None:
    """The bin of a bot solution length (see module doc); None below the first bin."""
    half = (bins[1] - bins[0]) / 2 if len(bins) > 1 else float("inf")
    for b in bins[:-1]:
        if b - half <= length < b + half:
            return b
    return bins[-1] if length >= bins[-1] - half else None


def check_bins(bins: list[int], levels: list[int]) -> None:
    """Raise ValueError unless bins are evenly spaced increasing ints and levels start at 1 and increase."""
    if len(bins) < 2 or any(not isinstance(b, int) for b in bins):
        raise ValueError(f"ood.behavioural_bins: expected at least two integers, got {bins}")
    steps = {b - a for a, b in zip(bins, bins[1:])}
    if len(steps) != 1 or steps.pop() <= 0:
        raise ValueError(f"ood.behavioural_bins: expected evenly spaced increasing values, got {bins}")
    if bins[0] - (bins[1] - bins[0]) / 2 > 0:
        raise ValueError(f"ood.behavioural_bins: the first bin must start at length 0, got {bins}")
    if not levels or levels != list(range(1, len(levels) + 1)):
        raise ValueError(f"ood.cognitive_levels: expected 1, 2, ..., n, got {levels}")


@dataclass(frozen=True)
class OodConfig:
    """The ``ood:`` section of params.yaml (the level is demos.level)."""

    seed: int = param(300_000_000, ge=0)
    episodes_per_bin: int = param(20, ge=1)
    max_candidates: int = param(3000, ge=1)  # seeds scanned to fill the bins
    workers: int = param(2, ge=1, speed=True)  # processes running the bot; the level sets do not depend on it
    behavioural_bins: list[int] = param([25, 75, 125], ge=1)
    cognitive_levels: list[int] = param([1, 2, 3, 4, 5, 6, 7, 8, 9], ge=1)

    def __post_init__(self):
        check_fields(self, "ood")
        check_bins(self.behavioural_bins, self.cognitive_levels)

    def seed_ranges(self, params: Mapping) -> dict[str, tuple[str, range]]:
        return {"ood.seed": ("test", range(self.seed, self.seed + self.max_candidates))}


def bot_solution_length(env) -> int | None:
    """Steps the expert bot takes to solve the freshly reset ``env``; None if it fails."""
    bot = FastBot(env)
    try:
        for step in range(1, env.unwrapped.max_steps + 1):
            _, reward, terminated, truncated, _ = env.step(bot.replan())
            if terminated or truncated:
                return step if reward > 0 else None
    except Exception:  # the bot's assertions (e.g. on MiniBossLevel) are a failure of that seed
        return None
    return None


_WORKER_ENV = None


def _measure(args: tuple[str, int]) -> tuple[int, int, int | None]:
    """(seed, cognitive difficulty, bot solution length) of one seed; runs in a worker."""
    global _WORKER_ENV
    env_id, seed = args
    if _WORKER_ENV is None or _WORKER_ENV.spec.id != env_id:
        _WORKER_ENV = make_env(env_id)
    reset_quiet(_WORKER_ENV, seed)
    return seed, mission_difficulty(_WORKER_ENV.unwrapped.instrs), bot_solution_length(_WORKER_ENV)


def kept_measure(record: dict) -> tuple[int, int | None]:
    """A scanned seed's (cognitive difficulty, bot solution length) from its record in a journal."""
    difficulty, length = record["cognitive_difficulty"], record["bot_length"]
    if type(difficulty) is not int or not (length is None or type(length) is int):
        raise ValueError(f"seed {record['seed']}'s record is not a scanned seed's")
    return difficulty, length


def make_level_sets(
    env_id: str,
    first_seed: int,
    episodes_per_bin: int,
    max_candidates: int,
    bins: list[int],
    levels: list[int],
    workers: int = 1,
    progress: bool = True,
    journal: Journal | None = None,
) -> dict:
    """Scan seeds upward from ``first_seed`` and fill both axes' bins (see module doc).

    Results are consumed in seed order, so the level sets do not depend on ``workers``.
    ``journal`` (decoding with :func:`kept_measure`): the seeds it keeps measured (part "scan")
    are not measured again, and every seed measured is added to it (tc.journal: a stopped
    stage goes on). A seed's measure does not depend on the bins: kept seeds serve other bins.
    """
    check_env_id(env_id)
    check_bins(bins, levels)
    if episodes_per_bin < 1 or max_candidates < 1:
        raise ValueError(
            f"ood.episodes_per_bin and ood.max_candidates must be >= 1, got {episodes_per_bin}, {max_candidates}"
        )
    sets = {"behavioural": {str(b): [] for b in bins}, "cognitive": {str(c): [] for c in levels}}
    measured: dict[str, dict] = {}  # seed -> its difficulties, for the selected seeds
    bot_failures: list[int] = []
    scanned = filled = 0  # filled: bins holding episodes_per_bin seeds
    candidates = range(first_seed, first_seed + max_candidates)
    kept = dict(journal.kept.get("scan", {})) if journal is not None else {}  # seed -> (difficulty, length)
    jobs = ((env_id, seed) for seed in candidates if seed not in kept)
    # Over seeds, not bins: the last bins (the longest solutions) may fill only near the end, or never.
    # The bar after the fork: tqdm starts a thread, and a process should not fork with threads running.
    with ordered_map(_measure, jobs, workers, chunksize=8) as measuring, \
            tqdm(total=max_candidates, desc="ood scan", unit="seed", disable=not progress) as bar:  # fmt: skip
        for seed in candidates:
            if seed in kept:
                difficulty, length = kept[seed]
            else:
                _, difficulty, length = next(measuring)
                if journal is not None:
                    record = {"seed": seed, "cognitive_difficulty": difficulty, "bot_length": length}
                    journal.add("scan", record, (difficulty, length))
            scanned += 1
            bar.update(1)
            cog = sets["cognitive"][str(cognitive_level(difficulty, levels))]
            picked = False
            if len(cog) < episodes_per_bin:
                cog.append(seed)
                picked = True
                filled += len(cog) == episodes_per_bin
            if length is None:
                bot_failures.append(seed)
            else:
                b = behavioural_bin(length, bins)
                beh = sets["behavioural"][str(b)]
                if len(beh) < episodes_per_bin:
                    beh.append(seed)
                    picked = True
                    filled += len(beh) == episodes_per_bin
            if picked:
                measured[str(seed)] = {"bot_length": length, "cognitive_difficulty": difficulty}
                bar.set_postfix_str(f"bins filled {filled}/{len(bins) + len(levels)}", refresh=False)
            if filled == len(bins) + len(levels):
                break
    unfilled = {
        axis: {k: len(s) for k, s in sets[axis].items() if len(s) < episodes_per_bin} for axis in AXES
    }
    return {
        "env_id": env_id,
        "first_seed": first_seed,
        "episodes_per_bin": episodes_per_bin,
        "candidates_scanned": scanned,
        "behavioural_bins": bins,
        "cognitive_levels": levels,
        **sets,
        "unfilled": unfilled,
        "bot_failures": bot_failures,
        "seeds": measured,
    }


def load_level_sets(path: str | Path) -> dict:
    """Read a level-set JSON written by ``stages/make_ood_levels.py``, checking its shape."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"OOD level sets {path} not found; run `dvc repro make_ood_levels` first")
    try:
        sets = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise FileFormatError(f"{path}: not valid JSON ({err})") from None
    missing = [k for k in ("env_id", *AXES) if not isinstance(sets, dict) or k not in sets]
    if missing:
        raise FileFormatError(f"{path}: not an OOD level-set file (missing keys {missing})")
    try:
        check_env_id(sets["env_id"])
    except ValueError as err:
        raise FileFormatError(f"{path}: env_id: {err}") from None
    for axis in AXES:
        bins = sets[axis]
        if not isinstance(bins, dict) or not all(
                isinstance(seeds, list) and all(type(s) is int and s >= 0 for s in seeds) for seeds in bins.values()):
            raise FileFormatError(f"{path}: {axis}: expected a mapping of bins to lists of seeds (ints >= 0)")
    return sets
