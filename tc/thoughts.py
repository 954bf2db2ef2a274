"""Synthetic thoughts: the BabyAI expert bot's current subgoal, with its purpose, in words.

The minigrid bot plans with a stack of subgoals (GoNextTo, Open, Close, Pickup, Drop,
Explore) but keeps no record of *why* a subgoal exists. ``ThoughtBot`` runs the bot's own
planning methods and records, for every subgoal, which subgoal pushed it (its parent) and,
for the subgoals made from the mission, which instruction they serve. A thought is then
read off the top of the stack: the verb and the object actually targeted, plus the
purpose found by walking up the parents. Every thought is one of ``expert_thoughts()``:
``TEMPLATES`` (all that 1,000 BossLevel episodes show) and the door verbs with every purpose.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from minigrid.core.world_object import WorldObj
from minigrid.envs.babyai.core.verifier import (
    ActionInstr,
    GoToInstr,
    ObjDesc,
    OpenInstr,
    PickupInstr,
    PutNextInstr,
)
from minigrid.utils.baby_ai_bot import (
    BabyAIBot,
    CloseSubgoal,
    DropSubgoal,
    ExploreSubgoal,
    GoNextToSubgoal,
    OpenSubgoal,
    PickupSubgoal,
)

from tc.fastbot import BotMismatch, FastBot
from tc.vocab import COLORS, OBJECT_TYPES

THOUGHTS_VERSION = 1

# {obj} is "<colour> <type>"; {door} is "<colour> door"; {key} is "<colour> key".
TEMPLATES = [
    "go to {obj} to complete goto mission",
    "open {door} to complete open mission",
    "unlock {door} to complete open mission",
    "close {door} to complete open mission",
    "pickup {obj} to complete pickup mission",
    "pickup {obj} to complete putnext mission",
    "drop {obj} to complete putnext mission",
    "open {door} to explore",
    "unlock {door} to explore",
    "open {door} to go through",
    "pickup {key} to unlock the door",
    "drop {obj} temporary to find the key",
    "drop {obj} temporary to remove blocking object",
    "remove blocking object {obj}",
    "pickup {obj} back",
    "drop {obj} to free hands",
    "explore unseen area",
]
NOISE_TYPES = ["key", "ball", "box"]
DOOR_VERBS = ("open", "unlock", "close")
DOOR_PURPOSES = ("to complete open mission", "to explore", "to go through")

_MISSION_PURPOSE = {
    GoToInstr: "to complete goto mission",
    OpenInstr: "to complete open mission",
    PickupInstr: "to complete pickup mission",
    PutNextInstr: "to complete putnext mission",
}


def _name(obj: WorldObj | None) -> str | None:
    return None if obj is None else f"{obj.color} {obj.type}"


@cache
def expert_thoughts() -> frozenset[str]:
    """A superset of the thoughts ThoughtBot can say: ``TEMPLATES`` with every colour and
    object (a door too, though only "go to" names one), and every door verb with every door
    purpose (some pairs, e.g. "unlock ... to go through", are rare enough that ``TEMPLATES``
    leaves them out)."""
    # A template has one placeholder at most, so one colour may fill all three (as random_thought does).
    filled = {t.format(obj=f"{c} {kind}", door=f"{c} door", key=f"{c} key")
              for t in TEMPLATES for c in COLORS for kind in ("door", *NOISE_TYPES)}  # fmt: skip
    return frozenset(filled | {f"{v} {c} door {p}" for v in DOOR_VERBS for c in COLORS for p in DOOR_PURPOSES})


def random_thought(rng: np.random.Generator) -> str:
    """A well-formed thought from ``TEMPLATES`` with random colours and types (for noise)."""
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    color = COLORS[rng.integers(len(COLORS))]
    return template.format(
        obj=f"{color} {NOISE_TYPES[rng.integers(len(NOISE_TYPES))]}",
        door=f"{color} door",
        key=f"{color} key",
    )


class _Tracing:
    """Mixin for a BabyAIBot: records for each subgoal its parent and its mission instruction.

    The bot class it is mixed into provides ``_refresh_subgoals`` (every subgoal's
    ``update_agent_attributes``, done at each step), which the fast bot does faster.
    """

    def __init__(self, env):
        self.found: dict[int, WorldObj | None] = {}  # id(ObjDesc) -> object the bot last chose
        super().__init__(env)

    def _process_instr(self, instr):
        n = len(self.stack)
        super()._process_instr(instr)
        if isinstance(instr, ActionInstr):
            for sg in self.stack[n:]:
                sg.tc_parent, sg.tc_instr = None, type(instr)

    def _find_obj_pos(self, obj_desc, adjacent=False):
        obj, pos = super()._find_obj_pos(obj_desc, adjacent)
        self.found[id(obj_desc)] = obj
        return obj, pos

    def _traced(self, subgoal, method, *args):
        """Call ``subgoal.method(*args)`` and record ``subgoal`` as the parent of what it pushes."""
        before = {id(sg) for sg in self.stack}
        result = getattr(subgoal, method)(*args)
        replaced = all(sg is not subgoal for sg in self.stack)
        for sg in self.stack:
            if id(sg) in before:
                continue
            if replaced and type(sg) is type(subgoal):
                # A subgoal that pops itself and pushes one of its own kind is replaced by it
                # (e.g. Open -> Open(reason="Unlock")): the new one inherits its place.
                sg.tc_parent, sg.tc_instr = subgoal.tc_parent, subgoal.tc_instr
            else:
                sg.tc_parent, sg.tc_instr = subgoal, None
        return result

    def replan(self, action_taken=None):
        # Same steps as BabyAIBot.replan, with each subgoal call traced.
        self._process_obs()
        self._check_erroneous_box_opening(action_taken)
        self._refresh_subgoals()
        if self.stack:
            self._traced(self.stack[-1], "replan_after_action", action_taken)
        while self.stack and self.stack[-1].is_exploratory():
            self.stack.pop()
        action = None
        while self.stack:
            action = self._traced(self.stack[-1], "replan_before_action")
            if action is not None:
                break
        if not self.stack:
            action = self.mission.unwrapped.actions.done
        self._remember_current_state()
        return action


class _TracingBot(_Tracing, BabyAIBot):
    """minigrid's bot, traced: the reference."""

    def _refresh_subgoals(self):
        for subgoal in self.stack:
            subgoal.update_agent_attributes()


class _FastTracingBot(_Tracing, FastBot):
    """Our faster bot (tc.fastbot), traced: the same actions and thoughts."""


BOTS = {"minigrid": _TracingBot, "fast": _FastTracingBot}


class ThoughtBot:
    """The expert bot that also says what it is doing.

    ``step(last_action, image)`` returns ``(action, thought)``; pass the action actually
    taken at the previous step (None at the first), which may differ from the advice
    (noise), and the current observation's image if at hand (the fast bot then need not
    recompute the agent's view). ``bot`` is "minigrid" (the reference) or "fast" (tc.fastbot).
    """

    def __init__(self, env, bot: str = "minigrid"):
        if bot not in BOTS:
            raise ValueError(f"unknown bot {bot!r}: expected one of {', '.join(BOTS)}")
        self.env = env.unwrapped
        self.bot = BOTS[bot](env)
        self.thought = "explore unseen area"
        self.temp_dropped: set[int] = set()  # ids of objects put down to be picked up again
        self.blockers: set[int] = set()      # ids of objects moved out of the way

    def step(self, last_action: int | None, image: np.ndarray | None = None) -> tuple[int, str]:
        if image is not None and isinstance(self.bot, FastBot):
            self.bot.image = image
        action = int(self.bot.replan(last_action))
        thought = self._read_stack()
        if thought is not None:  # keep the last thought when the stack says nothing new
            self.thought = thought
        return action, self.thought

    # -- reading the stack -------------------------------------------------------------

    def _target(self, sg) -> WorldObj | None:
        """The object a GoNextTo subgoal leads to, as the bot chose it."""
        if isinstance(sg.datum, ObjDesc):
            return self.bot.found.get(id(sg.datum))
        if isinstance(sg.datum, WorldObj):
            return sg.datum
        return self.env.grid.get(*sg.datum)

    def _read_stack(self) -> str | None:
        stack = self.bot.stack
        for i in range(len(stack) - 1, -1, -1):
            sg = stack[i]
            if isinstance(sg, ExploreSubgoal) or (isinstance(sg, GoNextToSubgoal) and sg.reason == "Explore"):
                return "explore unseen area"
            if not isinstance(sg, GoNextToSubgoal):
                if isinstance(sg, DropSubgoal) or i == len(stack) - 1:
                    return self._act_thought(sg, self._facing())
                return None  # under a detour: the target is not in front, keep the last thought
            if sg.tc_instr is GoToInstr:
                return self._with_obj("go to {} to complete goto mission", self._target(sg))
            below = stack[i - 1] if i > 0 else None
            # A GoNextTo pushed together with the action below it is that action's approach;
            # one pushed *by* the subgoal below it is a detour (undo after noise, stepping aside).
            if isinstance(below, (PickupSubgoal, OpenSubgoal, DropSubgoal)) and sg.tc_parent is not below:
                return self._act_thought(below, self._target(sg))
        return None

    def _facing(self) -> WorldObj | None:
        return self.env.grid.get(*self.env.front_pos)

    @staticmethod
    def _with_obj(template: str, obj: WorldObj | None) -> str | None:
        return None if obj is None else template.format(_name(obj))

    def _act_thought(self, sg, obj: WorldObj | None) -> str | None:
        """Thought for the action subgoal ``sg`` (Pickup/Drop/Open/Close) on ``obj``."""
        parent, instr = sg.tc_parent, sg.tc_instr
        if isinstance(sg, DropSubgoal):
            obj = self.env.carrying
            if obj is None:
                return None
            if instr is PutNextInstr:
                return f"drop {_name(obj)} to complete putnext mission"
            if id(obj) in self.blockers:
                return f"remove blocking object {_name(obj)}"
            if isinstance(parent, OpenSubgoal) and parent.reason == "Unlock":
                return f"drop {_name(obj)} to free hands"
            if isinstance(parent, OpenSubgoal):
                self.temp_dropped.add(id(obj))
                return f"drop {_name(obj)} temporary to find the key"
            if isinstance(parent, GoNextToSubgoal):
                self.temp_dropped.add(id(obj))
                return f"drop {_name(obj)} temporary to remove blocking object"
            return f"drop {_name(obj)} to free hands"
        if obj is None or obj.type not in OBJECT_TYPES:
            # A wall (or nothing nameable) in front: the bot is re-planning from a state the
            # agent took it to (oracle evaluation); it keeps its last thought.
            return None
        if isinstance(sg, PickupSubgoal):
            if instr is not None:
                return f"pickup {_name(obj)} {_MISSION_PURPOSE[instr]}"
            if id(obj) in self.temp_dropped:
                return f"pickup {_name(obj)} back"
            if obj.type == "key" and self._unlocks(parent, obj):
                return f"pickup {_name(obj)} to unlock the door"
            self.blockers.add(id(obj))
            return f"remove blocking object {_name(obj)}"
        if obj.type != "door":
            return None
        if isinstance(sg, CloseSubgoal):
            return f"close {_name(obj)} {self._door_purpose(sg.tc_parent)}"
        verb = "unlock" if obj.is_locked else "open"
        return f"{verb} {_name(obj)} {self._door_purpose(sg)}"

    def _unlocks(self, parent, key: WorldObj) -> bool:
        """Whether ``key`` is picked up for the locked door that ``parent`` was heading for."""
        if isinstance(parent, OpenSubgoal):
            door = parent.fwd_cell
        elif isinstance(parent, GoNextToSubgoal) and parent.reason == "Open":
            door = self._target(parent)
        else:
            return False
        return door is not None and door.type == "door" and door.is_locked and door.color == key.color

    @staticmethod
    def _door_purpose(sg) -> str:
        if sg is None or sg.tc_instr is not None:
            return DOOR_PURPOSES[0]
        if isinstance(sg.tc_parent, ExploreSubgoal):
            return DOOR_PURPOSES[1]
        return DOOR_PURPOSES[2]


class CheckedBot:
    """minigrid's bot and the fast one side by side on the same env, for checking identity.

    ``step`` is ThoughtBot's; it raises BotMismatch at the first step where the two bots
    differ in action, thought, or the error they fail with (an error both raise is re-raised).
    """

    def __init__(self, env):
        self.reference, self.fast = ThoughtBot(env, "minigrid"), ThoughtBot(env, "fast")
        self.t = 0

    def step(self, last_action: int | None, image: np.ndarray | None = None) -> tuple[int, str]:
        ref, ref_err = _outcome(self.reference.step, last_action)
        fast, fast_err = _outcome(self.fast.step, last_action, image)
        if ref != fast or _describe(ref_err) != _describe(fast_err):
            raise BotMismatch(f"step {self.t}: minigrid {ref or _describe(ref_err)}, fast {fast or _describe(fast_err)}")
        if ref_err is not None:
            raise ref_err
        self.t += 1
        return ref


def make_bot(env, bot: str) -> ThoughtBot | CheckedBot:
    """A thought bot: "minigrid", "fast", or "check" (both, compared at every step)."""
    return CheckedBot(env) if bot == "check" else ThoughtBot(env, bot)


def _outcome(step, *args) -> tuple[tuple[int, str] | None, Exception | None]:
    try:
        return step(*args), None
    except Exception as err:  # the bot's assertions and errors are part of its behaviour
        return None, err


def _describe(err: Exception | None) -> str | None:
    return None if err is None else f"{type(err).__name__}: {err}"
