"""Batched evaluation of agents (and of the bot) on a list of BabyAI seeds.

One chunk of up to ``batch_size`` environments advances together: each step stacks the
observations of the live environments, runs one agent forward pass on them and keeps
only the state rows of the environments still running. Modes:

- ``tc``      the agent generates its thoughts and acts on them (Thought Cloning);
- ``bc``      the agent acts on the mission only (Behavioural Cloning baseline);
- ``oracle``  a ThoughtBot follows each environment (told the action actually taken)
              and its thought replaces the generated one (``act(thoughts=...)``); when
              the bot cannot follow where the agent took the world, a new bot plans from
              the current state (the episode never ends for it);
- ``bot``     the ThoughtBot acts itself: the expert's reference success, no agent.

Action sampling draws from one random stream per episode, seeded by
``(sample_seed, env seed)``, so an episode's result does not depend on which other
episodes share its batch or on the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from minigrid.envs.babyai.core.verifier import PickupInstr, SeqInstr
from minigrid.utils.baby_ai_bot import DisappearedBoxError
from tqdm import tqdm

from tc import fastobs, vocab
from tc.checkpoint import CheckpointError, load_agent
from tc.device import pick_device
from tc.kernels import COMPILE_MODES
from tc.model import compile_or_warn
from tc.envs import ACTION_NAMES, Actions, check_env_id, make_env, reset_quiet
from tc.params import check_fields, param
from tc.stats import paired_difference, wilson_interval
from tc.thoughts import ThoughtBot

MODES = ("tc", "bc", "oracle", "bot")
PICKUP, DROP, TOGGLE = Actions.pickup, Actions.drop, Actions.toggle

# on_step(episode_index, step, env, thought, action) -> True to halt the episode before the action.
OnStep = Callable[[int, int, object, str | None, int], bool]
# thought_override(episode_index, step, proposed_thought) -> thought to act on, or None to keep it.
ThoughtOverride = Callable[[int, int, str], str | None]


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


def _thought_tensor(texts: list[str], device) -> torch.Tensor:
    return torch.from_numpy(vocab.encode_padded(texts, length=vocab.MAX_THOUGHT_LEN, eos=True)).long().to(device)


def _sample(logits: torch.Tensor, rngs: list[np.random.Generator], argmax: bool) -> list[int]:
    """Actions from ``logits`` [B, A]: argmax, or inverse-CDF sampling with one uniform per row's own stream."""
    if argmax:
        return logits.argmax(1).tolist()
    cdf = torch.softmax(logits.double(), 1).cumsum(1).cpu()
    u = torch.tensor([rng.random() for rng in rngs], dtype=torch.float64)
    return (cdf < u[:, None]).sum(1).clamp(max=logits.shape[1] - 1).tolist()


def check_mode(agent, mode: str) -> None:
    """Raise ValueError when ``mode`` is unknown or does not fit ``agent`` (thoughts or not)."""
    if mode not in MODES:
        raise ValueError(f"unknown evaluation mode {mode!r}; expected one of {MODES}")
    if mode == "bot":
        return
    if agent is None:
        raise ValueError(f"mode {mode!r} needs an agent (only 'bot' runs without one)")
    if mode in ("tc", "oracle") and not agent.cfg.use_thoughts:
        raise ValueError(f"mode {mode!r} needs a Thought Cloning agent; this checkpoint is BC (use_thoughts=False)")
    if mode == "bc" and agent.cfg.use_thoughts:
        raise ValueError("mode 'bc' needs a BC agent (use_thoughts=False); this checkpoint is TC")


def load_agent_for(path, mode: str, device: torch.device | str = "cpu"):
    """Load the checkpoint at ``path`` for ``mode``; a TC/BC mismatch is an error naming the file."""
    agent = load_agent(path, device)
    try:
        check_mode(agent, mode)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    return agent


def evaluate(
    agent,
    env_id: str,
    seeds: list[int],
    mode: str = "tc",
    *,
    batch_size: int = 64,
    argmax: bool = False,
    sample_seed: int = 0,
    on_step: OnStep | None = None,
    thought_override: ThoughtOverride | None = None,
    render: bool = False,
    max_steps: int | None = None,
    progress: bool = True,
    fast: bool = True,
) -> list[Rollout]:
    """Run one episode per seed and return them in the order of ``seeds`` (``agent`` is left in eval mode).

    ``on_step`` is called for every live environment after the action was chosen and
    before it is applied; returning True halts that episode (it ends, unsuccessful).
    ``thought_override`` (tc mode) may replace the generated thought of any step: the
    agent then acts on the given thought (thought steering).
    ``render`` keeps an RGB frame per step and one after the last step.
    ``max_steps`` overrides the level's own step limit (BossLevel allows ~600 per subtask).
    ``fast``: observations by tc.fastobs and the bot as tc.fastbot (byte-identical images, the
    same decisions; tests compare); False runs minigrid's own, the reference.
    """
    check_env_id(env_id)
    check_mode(agent, mode)
    if thought_override is not None and mode != "tc":
        raise ValueError(f"thought_override needs mode 'tc', got {mode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(agent.parameters()).device if agent is not None else torch.device("cpu")
    if agent is not None:
        agent.eval()
    env_kwargs = {"render_mode": "rgb_array"} if render else {}
    if max_steps is not None:
        env_kwargs["max_steps"] = int(max_steps)
    envs = [make_env(env_id, **env_kwargs) for _ in range(min(batch_size, len(seeds)))]
    if fast:
        for env in envs:
            fastobs.install(env)
    bot_kind = "fast" if fast else "minigrid"
    episodes: list[Rollout] = []
    bar = tqdm(total=len(seeds), desc=f"eval {mode}", unit="ep", disable=not progress)
    for start in range(0, len(seeds), batch_size):
        chunk = [int(s) for s in seeds[start : start + batch_size]]
        obs = [reset_quiet(env, s) for env, s in zip(envs, chunk)]
        eps = [Rollout(seed=s, mission=o["mission"]) for s, o in zip(chunk, obs)]
        requested = [requested_objects(env) for env in envs[: len(chunk)]]
        bots = [ThoughtBot(env, bot_kind) for env in envs[: len(chunk)]] if mode in ("oracle", "bot") else None
        advice = [bot.step(None) for bot in bots] if bots else None  # the bot's (action, thought) for this step
        rngs = [np.random.default_rng([sample_seed, s]) for s in chunk]
        live = list(range(len(chunk)))  # positions in the chunk, aligned with the rows of state/enc
        if agent is not None:
            with torch.inference_mode():
                missions = torch.from_numpy(vocab.encode_padded([e.mission for e in eps])).long().to(device)
                enc = agent.encode_mission(missions)
                state = agent.initial_state(len(chunk), device)
        while live:
            step = len(eps[live[0]].actions)  # all live episodes are at the same step
            if render:
                for j in live:
                    eps[j].frames.append(envs[j].render())
            if mode == "bot":
                actions = [advice[j][0] for j in live]
                thoughts = [advice[j][1] for j in live]
            else:
                given = [advice[j][1] for j in live] if mode == "oracle" else None
                thoughts, actions, state = _agent_step(
                    agent, obs, live, enc, state, given, rngs, argmax, thought_override, start, step, device
                )
            keep = []
            for k, j in enumerate(live):
                ep, a = eps[j], int(actions[k])
                thought = thoughts[k] if thoughts is not None else None
                if on_step is not None and on_step(start + j, step, envs[j], thought, a):
                    ep.halted = True
                    bar.update()
                    continue
                ep.actions.append(a)
                if thought is not None:
                    ep.thoughts.append(thought)
                obs[j], reward, done, event = step_env(envs[j], a, step, requested[j])
                ep.length += 1
                ep.reward += reward
                if event is not None:
                    ep.interactions.append(event)
                if not done and bots is not None:
                    advice[j] = _advise(bots, j, envs[j], ep, a, advice[j], bot_kind)
                if done:
                    ep.success = reward > 0
                    if render:
                        ep.frames.append(envs[j].render())
                    bar.update()
                else:
                    keep.append(k)
            if agent is not None and len(keep) < len(live):
                rows = torch.tensor(keep, dtype=torch.long, device=device)
                state = {key: v.index_select(0, rows) for key, v in state.items()}
                enc = {key: v.index_select(0, rows) for key, v in enc.items()}
            live = [live[k] for k in keep]
        episodes.extend(eps)
    bar.close()
    return episodes


def _advise(bots: list, j: int, env, ep: Rollout, action: int, previous: tuple[int, str],
            kind: str) -> tuple[int, str]:  # fmt: skip
    """The next (action, thought) of bot ``j``, told the action actually taken.

    The minigrid bot gives up when the agent opened a box (DisappearedBoxError) or moved the
    world into a state its planner asserts against (e.g. no path to a target it had found).
    Then a new bot plans from the current state (``ep.bot_restarts`` counts it); should that
    one fail too, the previous advice stands for this step and the next step tries again.
    """
    try:
        return bots[j].step(action)
    except (DisappearedBoxError, AssertionError):
        ep.bot_restarts += 1
    try:
        bots[j] = ThoughtBot(env, kind)
        return bots[j].step(None)
    except (DisappearedBoxError, AssertionError):
        return previous


@torch.inference_mode()
def _agent_step(agent, obs, live, enc, state, given, rngs, argmax, thought_override, start, step, device):
    """One forward pass for the live rows: returns (thought texts or None, actions, new state).

    ``given``: thoughts to act on (oracle) instead of generated ones.
    """
    images = torch.from_numpy(np.stack([obs[j]["image"] for j in live])).to(device)
    directions = torch.tensor([int(obs[j]["direction"]) for j in live], dtype=torch.long, device=device)
    out = agent.act(images, directions, enc, state, thoughts=None if given is None else _thought_tensor(given, device))
    thoughts = given
    if given is None and out.thoughts is not None:
        thoughts = [vocab.decode(row) for row in out.thoughts.tolist()]
        if thought_override is not None:
            forced = [thought_override(start + j, step, t) for j, t in zip(live, thoughts)]
            if any(f is not None for f in forced):
                # Act again from the same state, on the overriding thoughts: act() does not mutate state.
                thoughts = [f if f is not None else t for f, t in zip(forced, thoughts)]
                out = agent.act(images, directions, enc, state, thoughts=_thought_tensor(thoughts, device))
    actions = _sample(out.logits.float(), [rngs[j] for j in live], argmax)
    return thoughts, actions, out.state


def steer(
    agent,
    env_id: str,
    seed: int,
    thought: str | ThoughtOverride,
    *,
    from_step: int = 0,
    to_step: int | None = None,
    argmax: bool = True,
    render: bool = False,
    max_steps: int | None = None,
) -> Rollout:
    """One TC episode in which a person's thought replaces the agent's own (thought steering).

    ``thought`` is either a fixed thought, in force for steps ``from_step`` <= step <
    ``to_step``, or a function ``(episode_index, step, proposed_thought) -> thought | None``
    (None keeps the agent's thought), e.g. one asking a person at every step.
    """
    if isinstance(thought, str):
        text = thought
        ids = vocab.encode(text)  # raises ValueError naming a word outside the vocabulary
        if not ids or len(ids) >= vocab.MAX_THOUGHT_LEN:
            raise ValueError(f"thought {text!r} must have 1 to {vocab.MAX_THOUGHT_LEN - 1} words")

        def thought(_episode: int, step: int, _proposed: str) -> str | None:
            return text if from_step <= step and (to_step is None or step < to_step) else None
    (episode,) = evaluate(
        agent, env_id, [seed], "tc", batch_size=1, argmax=argmax, thought_override=thought,
        render=render, max_steps=max_steps, progress=False,
    )  # fmt: skip
    return episode


@dataclass(frozen=True)
class EvaluateConfig:
    """The ``evaluate:`` section of params.yaml, also the evaluation settings of the ood and safety stages."""

    seed: int = param(200_000_000, ge=0)  # first test seed; also seeds the per-episode action sampling
    episodes: int = param(200, ge=1)
    batch_size: int = param(64, ge=1, speed=True)  # results do not depend on it (one sampling stream per episode)
    argmax: bool = param(False)
    device: str = param("auto", choices=("auto", "cpu", "cuda"), speed=True)
    threads: int = param(1, ge=0, speed=True)
    max_steps: int | None = param(None, ge=1)  # None: the level's own step limit
    compile: str | None = param(None, choices=COMPILE_MODES, speed=True)  # torch.compile of each step (Agent.compile_steps)

    def __post_init__(self):
        check_fields(self, "evaluate")

    def kwargs(self) -> dict:
        """Keyword arguments of :func:`evaluate`: batch_size, argmax, sample_seed (= seed), max_steps."""
        return {"batch_size": self.batch_size, "argmax": self.argmax, "sample_seed": self.seed,
                "max_steps": self.max_steps}  # fmt: skip

    def device_for_torch(self) -> torch.device:
        """The device of ``device``, with ``threads`` intra-op threads on the CPU (see tc.device)."""
        return pick_device(self.device, self.threads)

    def load_agent(self, path, mode: str):
        """The checkpoint at ``path`` for ``mode`` on this config's device, compiled as ``compile`` says."""
        agent = load_agent_for(path, mode, self.device_for_torch())
        compile_or_warn(agent, self.compile, "evaluate.compile")
        return agent


def summarize(episodes: list[Rollout]) -> dict:
    """Success rate with its 95% (Wilson) interval, mean return, mean length (steps), halted
    episodes (intervention) and the times an oracle bot could not follow the agent and a new
    one planned from where it was."""
    n = len(episodes)
    mean = (lambda xs: float(np.mean(xs))) if n else (lambda xs: None)  # an empty OOD bin: null
    low, high = wilson_interval(sum(e.success for e in episodes), n) if n else (None, None)
    return {
        "episodes": n,
        "success_rate": mean([e.success for e in episodes]),
        "success_ci_low": low,
        "success_ci_high": high,
        "mean_return": mean([e.reward for e in episodes]),
        "mean_length": mean([e.length for e in episodes]),
        "halted": sum(e.halted for e in episodes),
        "bot_restarts": sum(e.bot_restarts for e in episodes),
    }


def success_difference(a: list[Rollout], b: list[Rollout]) -> dict:
    """Success rate of ``a`` minus that of ``b`` with its paired 95% interval (tc.stats), the
    episodes paired by seed: ``b`` must hold every seed of ``a``."""
    by_seed = {e.seed: e.success for e in b}
    return paired_difference([int(e.success) for e in a], [int(by_seed[e.seed]) for e in a])
