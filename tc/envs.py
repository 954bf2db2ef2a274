"""Making BabyAI environments: lookup by id with helpful errors, seeding, quiet level generation, the action names."""

from __future__ import annotations

import contextlib
import difflib
import io
import signal
import threading
from collections.abc import Iterator

import gymnasium as gym
import minigrid  # noqa: F401  (importing registers the BabyAI-* ids with gymnasium)
from minigrid.core.actions import Actions

from tc.params import UserError

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


class LevelGenerationError(UserError, RuntimeError):
    """A level whose generator did not finish for a seed (see :func:`reset_quiet`)."""


# A BabyAI level is generated in milliseconds; one that takes this long never ends.
RESET_TIMEOUT_S = 60.0


def reset_quiet(env: gym.Env, seed: int, timeout_s: float | None = None) -> dict:
    """Reset ``env`` with ``seed`` and return the first observation.

    BabyAI's level generator prints a line for every rejected sample; at millions of
    episodes that floods the logs, so stdout is captured during the reset. A generator
    still running after ``timeout_s`` raises :class:`LevelGenerationError` naming the level
    and seed instead of hanging: minigrid's ``RoomGrid.place_agent`` loops forever when
    every free cell of the room faces an object (BabyAI-SynthS5R2, seed 200000192).
    ``timeout_s`` None: :data:`RESET_TIMEOUT_S`.
    """
    timeout_s = RESET_TIMEOUT_S if timeout_s is None else timeout_s
    with contextlib.redirect_stdout(io.StringIO()), _deadline(timeout_s, env, seed):
        obs, _ = env.reset(seed=int(seed))
    return obs


@contextlib.contextmanager
def _deadline(seconds: float, env: gym.Env, seed: int) -> Iterator[None]:
    """Interrupt the block after ``seconds`` with SIGALRM (Unix, main thread; elsewhere no deadline)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise LevelGenerationError(f"{env.spec.id if env.spec else env}: seed {seed} was not generated within "
                                   f"{seconds:g} s (minigrid's level generator loops forever on some seeds); "
                                   f"use other seeds")  # fmt: skip

    previous = signal.signal(signal.SIGALRM, expire)
    # Then again every second: an exception raised while a finaliser runs (a garbage collection
    # during the generator's loop) is printed and dropped, and one alarm would be lost.
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
