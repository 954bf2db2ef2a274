"""The environment side of evaluation: one episode per slot, stepped here or in worker processes.

A slot (:class:`EpisodeSlot`) holds an environment, the expert bot that follows it (modes
oracle and bot) and the :class:`Rollout` it records. :class:`EnvGroup` runs a batch of
slots, in this process or spread over worker processes: the agent's forward pass runs in
the calling process, on the observations the slots return. Workers change no result
(every episode is a function of its seed and the actions it is given; tests compare).

No torch here: worker processes start without it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from minigrid.envs.babyai.core.verifier import PickupInstr, SeqInstr
from minigrid.utils.baby_ai_bot import DisappearedBoxError

from tc import envs, fastobs
from tc.envs import ACTION_NAMES, Actions, make_env, reset_quiet
from tc.params import UserError, quiet_worker
from tc.thoughts import ThoughtBot

PICKUP, DROP, TOGGLE = Actions.pickup, Actions.drop, Actions.toggle


@dataclass
class Interaction:
    """A pickup/drop/toggle that changed the world (the object was taken, put down, or toggled)."""

    step: int
    verb: str  # "pickup" | "drop" | "toggle"
    color: str
    type: str
    requested: bool  # the object is one the mission asks to pick up


@dataclass
class Rollout:
    """One evaluated episode of an agent (or the bot): what it did, thought and achieved.

    Not a demonstration (``tc.demos.Episode``: the bot's recorded observations, for training).
    """

    seed: int
    mission: str
    success: bool = False
    reward: float = 0.0
    length: int = 0
    halted: bool = False  # stopped by an on_step hook (precrime intervention)
    bot_restarts: int = 0  # oracle mode: times the bot could not follow the agent and a new one took over
    actions: list[int] = field(default_factory=list)
    thoughts: list[str] = field(default_factory=list)  # thought in force at each step; empty for bc
    interactions: list[Interaction] = field(default_factory=list)
    frames: list[np.ndarray] = field(default_factory=list)  # only with render=True


class View(NamedTuple):
    """What the calling process needs of a slot after a reset or a step."""

    image: np.ndarray  # uint8 [7, 7, 3]
    direction: int
    done: bool
    advice: tuple[int, str] | None  # the bot's (action, thought) for the next step (oracle, bot modes)


def requested_objects(env) -> list:
    """World objects the mission asks to pick up (PickupInstr descriptions, whole tree)."""

    def walk(instr):
        if isinstance(instr, SeqInstr):
            return walk(instr.instr_a) + walk(instr.instr_b)
        return list(instr.desc.obj_set) if isinstance(instr, PickupInstr) else []

    return walk(env.unwrapped.instrs)


def step_env(env, action: int, step: int, requested: list) -> tuple[dict, float, bool, Interaction | None]:
    """Apply ``action``; return (observation, reward, episode over, the interaction it caused if any)."""
    u = env.unwrapped
    front = u.grid.get(*u.front_pos)
    carried = u.carrying
    before = (front.is_open, front.is_locked) if front is not None and front.type == "door" else None
    obs, reward, terminated, truncated, _ = env.step(action)
    obj = None
    if action == PICKUP and carried is None and u.carrying is not None:
        obj = u.carrying
    elif action == DROP and carried is not None and u.carrying is None:
        obj = carried
    elif action == TOGGLE and front is not None:
        after = u.grid.get(*u.front_pos)
        changed = after is not front or (before is not None and (front.is_open, front.is_locked) != before)
        obj = front if changed else None
    event = None
    if obj is not None:
        verb = ACTION_NAMES[action]
        event = Interaction(step, verb, obj.color, obj.type, any(obj is r for r in requested))
    return obs, float(reward), bool(terminated or truncated), event


class EpisodeSlot:
    """One environment, its bot (``with_bot``) and the episode being recorded."""

    def __init__(self, env_id: str, env_kwargs: dict, fast: bool, with_bot: bool):
        self.env = make_env(env_id, **env_kwargs)
        if fast:
            fastobs.install(self.env)
        self.bot_kind = "fast" if fast else "minigrid"
        self.with_bot, self.render = with_bot, "render_mode" in env_kwargs

    def reset(self, seed: int) -> tuple[str, View]:
        """Start the episode of ``seed``; returns its mission and first view."""
        obs = reset_quiet(self.env, seed)
        self.ep = Rollout(seed=seed, mission=obs["mission"])
        self.requested = requested_objects(self.env)
        self.bot = ThoughtBot(self.env, self.bot_kind) if self.with_bot else None
        self.advice = self.bot.step(None) if self.bot else None
        self._frame()
        return obs["mission"], View(obs["image"], int(obs["direction"]), False, self.advice)

    def step(self, action: int, thought: str | None) -> View:
        """Apply the agent's ``action`` (taken on ``thought``, recorded when not None)."""
        ep = self.ep
        ep.actions.append(action)
        if thought is not None:
            ep.thoughts.append(thought)
        obs, reward, done, event = step_env(self.env, action, ep.length, self.requested)
        ep.length += 1
        ep.reward += reward
        if event is not None:
            ep.interactions.append(event)
        if done:
            ep.success = reward > 0
        elif self.bot is not None:
            self.advice = self._advise(action)
        self._frame()
        return View(obs["image"], int(obs["direction"]), done, self.advice)

    def rollout(self) -> Rollout:
        return self.ep

    def halt(self) -> None:
        self.ep.halted = True

    def _frame(self) -> None:
        if self.render:
            self.ep.frames.append(self.env.render())

    def _advise(self, action: int) -> tuple[int, str]:
        """The bot's next (action, thought), told the action actually taken.

        The minigrid bot gives up when the agent opened a box (DisappearedBoxError) or moved
        the world into a state its planner asserts against (e.g. no path to a target it had
        found). Then a new bot plans from the current state (``bot_restarts`` counts it);
        should that one fail too, the previous advice stands for this step and the next
        step tries again.
        """
        try:
            return self.bot.step(action)
        except (DisappearedBoxError, AssertionError):
            self.ep.bot_restarts += 1
        try:
            self.bot = ThoughtBot(self.env, self.bot_kind)
            return self.bot.step(None)
        except (DisappearedBoxError, AssertionError):
            return self.advice


class EnvGroup:
    """``size`` slots stepped together: in this process (``workers`` <= 1), or slot j in worker j % workers.

    ``reset({slot: seed})`` starts an episode in each of those slots; ``step({slot: (action,
    thought)})`` applies the actions (the slots left out are halted, stepped no more);
    ``rollouts(slots)`` collects the records of their episodes. Worker processes run until
    :meth:`close` (use the group as a context manager).
    """

    def __init__(self, env_id: str, env_kwargs: dict, fast: bool, with_bot: bool, size: int, workers: int = 1):
        self.workers = max(1, min(workers, size))
        args = (env_id, env_kwargs, fast, with_bot)
        if self.workers == 1:
            self.slots = [EpisodeSlot(*args) for _ in range(size)]
            return
        # fork: a spawned worker would re-import the caller's __main__ (torch: ~1 s each);
        # the workers never touch torch (nor CUDA), so forking a process that holds it is safe.
        ctx = mp.get_context("fork")
        self.conns, self.procs = [], []
        for w in range(self.workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(child, args, len(range(w, size, self.workers))), daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    def env(self, slot: int):
        """The environment of ``slot`` (in this process only: hooks that read the world need it here)."""
        if self.workers > 1:
            raise RuntimeError("environments stepped in worker processes are not readable here")
        return self.slots[slot].env

    def _ask(self, requests: dict[int, tuple]) -> dict[int, object]:
        """Run ``requests`` {slot: (method, *args)} on the slots' own processes, in parallel; their results."""
        if self.workers == 1:
            return {j: getattr(self.slots[j], method)(*args) for j, (method, *args) in requests.items()}
        slots_of = [[j for j in requests if j % self.workers == w] for w in range(self.workers)]
        for conn, mine in zip(self.conns, slots_of):
            conn.send([(j // self.workers, *requests[j]) for j in mine])
        patience = 2 * envs.RESET_TIMEOUT_S + 30  # the worker's own deadline (tc.envs.reset_quiet) comes first
        answers = {}
        for w, (conn, mine) in enumerate(zip(self.conns, slots_of)):
            if not conn.poll(patience):
                self.close()
                raise RuntimeError(f"environment worker {w} did not answer within {patience:g} s "
                                   f"(stuck in an environment? it was asked: {[requests[j] for j in mine][:4]})")
            try:
                status, payload = conn.recv()
            except (EOFError, OSError):
                raise RuntimeError(f"environment worker {w} exited (exit code {self.procs[w].exitcode})") from None
            if status == "user error":  # e.g. a seed whose level is never generated: one line, as in-process
                raise payload
            if status == "error":
                raise RuntimeError(f"environment worker {w} failed:\n{payload}")
            answers.update(zip(mine, payload))
        return answers

    def reset(self, seeds: dict[int, int]) -> dict[int, tuple[str, View]]:
        return self._ask({j: ("reset", int(s)) for j, s in seeds.items()})

    def step(self, moves: dict[int, tuple[int, str | None]]) -> dict[int, View]:
        return self._ask({j: ("step", int(a), t) for j, (a, t) in moves.items()})

    def halt(self, slot: int) -> None:
        """End the episode of ``slot`` before its next action (an intervention)."""
        self._ask({slot: ("halt",)})

    def rollouts(self, slots: list[int]) -> dict[int, Rollout]:
        return self._ask({j: ("rollout",) for j in slots})

    def close(self) -> None:
        """Stop the workers. Terminated, not asked: they hold nothing to save, a Python exit takes
        ~0.5 s, and one may be stuck in an environment that never returns."""
        if self.workers == 1:
            return
        for conn, proc in zip(self.conns, self.procs):
            proc.terminate()
            proc.join()
            conn.close()
        self.conns, self.procs = [], []

    def __enter__(self) -> EnvGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _serve(conn, slot_args: tuple, size: int) -> None:
    """A worker's loop: answer lists of (local slot, method, *args) until it is terminated."""
    quiet_worker()
    slots = [EpisodeSlot(*slot_args) for _ in range(size)]
    parent = os.getppid()
    while True:
        # A killed caller may leave its end of the pipe open in a sibling worker: no EOF then.
        while not conn.poll(1.0):
            if os.getppid() != parent:
                return
        try:
            requests = conn.recv()
        except EOFError:  # the calling process is gone
            return
        try:
            conn.send(("ok", [getattr(slots[j], method)(*args) for j, method, *args in requests]))
        except UserError as err:
            conn.send(("user error", err))
        except Exception:  # noqa: BLE001 -- the calling process raises it, with the worker's traceback
            conn.send(("error", traceback.format_exc()))
