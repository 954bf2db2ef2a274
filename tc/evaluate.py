"""Batched evaluation of agents (and of the bot) on a list of BabyAI seeds.

Up to ``batch_size`` environments advance together: each step stacks the observations of
the live environments, runs one agent forward pass on them and keeps only the state rows
of the environments still running; an environment whose episode ended starts the next
seed at once, so the batch stays full while seeds are left. A failing BossLevel episode
runs for up to ~2,900 steps, and on a GPU a forward pass costs far less than in
proportion to its rows (H100, paper size: 64 rows took 1.8x the time of 1). Modes:

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

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from tc import vocab
from tc.checkpoint import CheckpointError, load_agent
from tc.device import pick_device
from tc.envs import check_env_id
from tc.episodes import PICKUP, EnvGroup, Interaction, Rollout  # noqa: F401  (Interaction, PICKUP: re-exported)
from tc.journal import Part
from tc.kernels import COMPILE_MODES, one_line, record
from tc.model import AgentOutput, compile_or_warn
from tc.params import check_fields, param
from tc.stats import paired_difference, wilson_interval

MODES = ("tc", "bc", "oracle", "bot")

# on_step(episode_index, step, env, thought, action) -> True to halt the episode before the action.
OnStep = Callable[[int, int, object, str | None, int], bool]
# thought_override(episode_index, step, proposed_thought) -> thought to act on, or None to keep it.
ThoughtOverride = Callable[[int, int, str], str | None]


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
    workers: int = 1,
    cuda_graphs: bool = False,
    journal: Part | None = None,
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
    ``workers``: processes stepping the environments (and bots) while this one runs the agent;
    1: all in this process, as always with ``on_step`` (it reads the world). The results do
    not depend on it (tc.episodes).
    ``cuda_graphs``: on CUDA, the agent's steps are replayed from CUDA graphs (:class:`ActGraphs`);
    elsewhere ignored.
    ``journal``: the episodes of these seeds it keeps are taken from it, not played again, and
    every episode played is added to it as it ends (tc.journal: a stopped stage goes on).
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
    if journal is not None and render:
        raise ValueError("a journal keeps no rendered frames: render needs journal=None")
    reused = journal.kept() if journal is not None else {}
    episodes: list[Rollout | None] = [reused.get(int(s)) for s in seeds]
    todo = [i for i, e in enumerate(episodes) if e is None]  # indices of the seeds to play
    if not todo:
        return episodes
    rows = min(batch_size, len(todo))
    act = getattr(agent, "act", None)  # None: the bot acts
    if cuda_graphs and device.type == "cuda" and agent is not None:
        act = ActGraphs(agent, rows)
    env_kwargs = {"render_mode": "rgb_array"} if render else {}
    if max_steps is not None:
        env_kwargs["max_steps"] = int(max_steps)
    if on_step is not None:
        workers = 1  # the hook reads the world: the environments must be in this process
    bar = tqdm(total=len(seeds), initial=len(seeds) - len(todo), desc=f"eval {mode}", unit="ep", disable=not progress)
    with EnvGroup(env_id, env_kwargs, fast, mode in ("oracle", "bot"), rows, workers) as group:
        # Slot j plays episode episode_of[j], now at its step steps[j]; live: the slots playing,
        # aligned with the rows of state/enc. A slot whose episode ends starts the next seed at
        # once: a forward pass has ``rows`` rows until fewer episodes than that are left.
        episode_of, steps, views, rngs = [0] * rows, [0] * rows, [None] * rows, [None] * rows
        live: list[int] = []
        free, upcoming = list(range(rows)), 0
        enc = state = None
        while True:
            if free and upcoming < len(todo):
                started, free = free[: len(todo) - upcoming], free[len(todo) - upcoming :]
                starts = group.reset({j: int(seeds[todo[upcoming + k]]) for k, j in enumerate(started)})
                for k, j in enumerate(started):
                    episode_of[j], steps[j], views[j] = todo[upcoming + k], 0, starts[j][1]
                    rngs[j] = np.random.default_rng([sample_seed, int(seeds[todo[upcoming + k]])])
                upcoming += len(started)
                live += started
                if agent is not None:
                    enc, state = _add_rows(agent, enc, state, [starts[j][0] for j in started], device)
            if not live:
                break
            if mode == "bot":
                actions = [views[j].advice[0] for j in live]
                thoughts = [views[j].advice[1] for j in live]
            else:
                given = [views[j].advice[1] for j in live] if mode == "oracle" else None
                thoughts, actions, state = _agent_step(
                    act, views, live, enc, state, given, rngs, argmax, thought_override, episode_of, steps, device
                )
            moves = {}
            for k, j in enumerate(live):
                thought = thoughts[k] if thoughts is not None else None
                if on_step is not None and on_step(episode_of[j], steps[j], group.env(j), thought, int(actions[k])):
                    group.halt(j)
                    continue
                moves[j] = (int(actions[k]), thought)
            views_now = group.step(moves)
            for j, view in views_now.items():
                views[j] = view
                steps[j] += 1
            ended = {j for j in live if j not in views_now or views_now[j].done}  # halted or over
            if ended:
                for j, rollout in group.rollouts(sorted(ended)).items():
                    episodes[episode_of[j]] = rollout
                    if journal is not None:
                        journal.add(rollout)
                free += sorted(ended)
                bar.update(len(ended))
                if agent is not None:
                    kept = torch.tensor([k for k, j in enumerate(live) if j not in ended], dtype=torch.long,
                                        device=device)  # fmt: skip
                    state = {key: v.index_select(0, kept) for key, v in state.items()}
                    enc = {key: v.index_select(0, kept) for key, v in enc.items()}
                live = [j for j in live if j not in ended]
    bar.close()
    return episodes


@torch.inference_mode()
def _add_rows(agent, enc, state, missions: list[str], device) -> tuple[dict, dict]:
    """The mission encodings and state rows with those of new episodes (zero memories) appended;
    the word axis padded to the longer of the two (what is added is padding: "pads" True there)."""
    new = agent.encode_mission(torch.from_numpy(vocab.encode_padded(missions)).long().to(device))
    fresh = agent.initial_state(len(missions), device)
    if enc is None:
        return new, fresh
    width = max(enc["words"].shape[1], new["words"].shape[1])
    widen = lambda t, pad: F.pad(t, (0, 0) * (t.dim() - 2) + (0, width - t.shape[1]), value=pad)  # noqa: E731
    enc = {k: torch.cat([widen(enc[k], k == "pads"), widen(new[k], k == "pads")]) for k in enc}
    return enc, {k: torch.cat([state[k], fresh[k]]) for k in state}


class ActGraphs:
    """``Agent.act`` replayed from CUDA graphs (``evaluate.cuda_graphs``): one launch per step.

    An evaluation step is one forward pass of a few hundred small kernels for the live
    environments, on a GPU bound by launching them. Here every step runs ``rows`` rows: the
    live ones, then rows left from earlier steps or copies of the first (in eval mode rows do
    not interact: the live rows' results are the same), mission words padded to a multiple
    of ``WORDS``, in the agent's fixed-shape path (no host synchronisation; greedy decoding
    of every word). One graph per mission width and per thoughts given or generated, in one
    memory pool. Off CUDA each replay runs eagerly (tc.kernels.record: what the CPU tests
    check). Where capturing fails, one warning line, and the agent acts eagerly.
    """

    WORDS = 8

    def __init__(self, agent, rows: int):
        self.agent, self.rows = agent, rows
        self.graphs: dict[tuple, tuple] = {}  # (mission words, thought words or None) -> (inputs, outputs, replay)
        self.pool = None
        self.problem: str | None = None

    def __call__(self, images: torch.Tensor, directions, mission: dict[str, torch.Tensor],
                 state: dict[str, torch.Tensor], thoughts: torch.Tensor | None = None) -> AgentOutput:  # fmt: skip
        """As ``agent.act`` for up to ``rows`` environments."""
        if self.problem is not None:
            return self.agent.act(images, directions, mission, state, thoughts)
        n, width = images.shape[0], mission["words"].shape[1]
        pad = -width % self.WORDS
        live = {"images": images, "words": F.pad(mission["words"], (0, 0, 0, pad)),
                "pads": F.pad(mission["pads"], (0, pad), value=True), **{f"state.{k}": v for k, v in state.items()}}  # fmt: skip
        if thoughts is not None:
            live["thoughts"] = thoughts
        key = (width + pad, None if thoughts is None else thoughts.shape[1])
        if key not in self.graphs:
            inputs = {k: torch.cat([v, v[:1].expand(self.rows - n, *v.shape[1:])]) for k, v in live.items()}
            try:
                self.graphs[key] = (inputs, *self._capture(inputs))
            except Exception as err:  # noqa: BLE001 -- whatever the cause, the agent acts eagerly
                self.problem = one_line(err)
                print(f"warning: evaluate.cuda_graphs: capturing a step failed ({self.problem}); acting eagerly",
                      file=sys.stderr)
                return self.agent.act(images, directions, mission, state, thoughts)
        inputs, outputs, replay = self.graphs[key]
        for k, v in live.items():
            inputs[k][:n].copy_(v)
        replay()
        rows = {k: v[:n].clone() for k, v in outputs.items()}  # read before the next replay (tc.kernels.record)
        return AgentOutput(rows["logits"], rows.get("thoughts"), None,
                           {k.removeprefix("state."): v for k, v in rows.items() if k.startswith("state.")})

    def _capture(self, inputs: dict[str, torch.Tensor]) -> tuple:
        def step() -> dict[str, torch.Tensor]:
            state = {k.removeprefix("state."): v for k, v in inputs.items() if k.startswith("state.")}
            out = self.agent.act(inputs["images"], None, {"words": inputs["words"], "pads": inputs["pads"]}, state,
                                 inputs.get("thoughts"), fixed=True)  # fmt: skip
            thoughts = {} if out.thoughts is None else {"thoughts": out.thoughts}
            return {"logits": out.logits, **thoughts, **{f"state.{k}": v for k, v in out.state.items()}}

        (outputs,), (replay,), self.pool = record([step], inputs["images"].device, self.pool)
        return outputs, replay


@torch.inference_mode()
def _agent_step(act, views, live, enc, state, given, rngs, argmax, thought_override, episode_of, steps, device):
    """One forward pass (``act``: ``agent.act`` or :class:`ActGraphs`) for the live slots: returns
    (thought texts or None, actions, new state).

    ``given``: thoughts to act on (oracle) instead of generated ones.
    """
    images = torch.from_numpy(np.stack([views[j].image for j in live])).to(device)
    directions = torch.tensor([views[j].direction for j in live], dtype=torch.long, device=device)
    out = act(images, directions, enc, state, thoughts=None if given is None else _thought_tensor(given, device))
    thoughts = given
    if given is None and out.thoughts is not None:
        thoughts = [vocab.decode(row) for row in out.thoughts.tolist()]
        if thought_override is not None:
            forced = [thought_override(episode_of[j], steps[j], t) for j, t in zip(live, thoughts)]
            if any(f is not None for f in forced):
                # Act again from the same state, on the overriding thoughts: act() does not mutate state.
                thoughts = [f if f is not None else t for f, t in zip(forced, thoughts)]
                out = act(images, directions, enc, state, thoughts=_thought_tensor(thoughts, device))
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
    workers: int = param(1, ge=1, speed=True)  # processes stepping the environments and bots (evaluate's workers)
    cuda_graphs: bool = param(False, speed=True)  # the agents' steps replayed from CUDA graphs (ActGraphs); CUDA only

    def __post_init__(self):
        check_fields(self, "evaluate")

    def seed_ranges(self, params: Mapping) -> dict[str, tuple[str, range]]:
        return {"evaluate.seed": ("test", range(self.seed, self.seed + self.episodes))}

    def kwargs(self) -> dict:
        """Keyword arguments of :func:`evaluate`: batch_size, argmax, sample_seed (= seed), max_steps, workers,
        cuda_graphs."""
        return {"batch_size": self.batch_size, "argmax": self.argmax, "sample_seed": self.seed,
                "max_steps": self.max_steps, "workers": self.workers, "cuda_graphs": self.cuda_graphs}  # fmt: skip

    def outcome_settings(self, device: torch.device) -> dict:
        """What an episode's result depends on besides its seed, level and agent (tc.journal): the
        sampling, the step limit and what changes float rounding (the device, its threads, compile,
        CUDA graphs). Not the episode count, the batch size or the workers: they change no episode."""
        return {"seed": self.seed, "argmax": self.argmax, "max_steps": self.max_steps, "device": device.type,
                "threads": self.threads, "compile": self.compile, "cuda_graphs": self.cuda_graphs}  # fmt: skip

    def device_for_torch(self) -> torch.device:
        """The device of ``device``, with ``threads`` intra-op threads on the CPU (see tc.device)."""
        return pick_device(self.device, self.threads, key="evaluate.device")

    def load_agent(self, path, mode: str):
        """The checkpoint at ``path`` for ``mode`` on this config's device, compiled as ``compile`` says."""
        device = self.device_for_torch()
        agent = load_agent_for(path, mode, device)
        compile_or_warn(agent, self.compile, "evaluate.compile")
        if self.cuda_graphs and device.type != "cuda":
            print(f"warning: evaluate.cuda_graphs: needs a CUDA device (here: {device.type}); acting eagerly",
                  file=sys.stderr)
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
