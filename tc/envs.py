"""Making BabyAI environments: lookup by id with helpful errors, seeding, quiet level generation, the action names."""

from __future__ import annotations

import contextlib
import difflib
import io

import gymnasium as gym
import minigrid  # noqa: F401  (importing registers the BabyAI-* ids with gymnasium)
from minigrid.core.actions import Actions

# The action table, minigrid's own: index = action id (left, right, forward, pickup, drop, toggle, done).
ACTION_NAMES = [a.name for a in Actions]


def babyai_ids() -> list[str]:
    """All registered BabyAI environment ids, sorted."""
    return sorted(env_id for env_id in gym.registry if env_id.startswith("BabyAI-"))


def check_env_id(env_id: str) -> None:
    """Raise ValueError naming close matches when ``env_id`` is not a registered BabyAI level."""
    ids = babyai_ids()
    if env_id in ids:
        return
    close = difflib.get_close_matches(env_id, ids, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else f" Known ids start with 'BabyAI-', e.g. {ids[0]}."
    raise ValueError(f"unknown BabyAI level {env_id!r} ({len(ids)} registered).{hint}")


def make_env(env_id: str, **kwargs) -> gym.Env:
    """Create a BabyAI env by id (see ``babyai_ids``); extra kwargs go to ``gym.make``."""
    check_env_id(env_id)
    return gym.make(env_id, **kwargs)


def reset_quiet(env: gym.Env, seed: int) -> dict:
    """Reset ``env`` with ``seed`` and return the first observation.

    BabyAI's level generator prints a line for every rejected sample; at millions of
    episodes that floods the logs, so stdout is captured during the reset.
    """
    with contextlib.redirect_stdout(io.StringIO()):
        obs, _ = env.reset(seed=int(seed))
    return obs
