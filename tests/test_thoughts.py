"""Thoughts of the bot on hand-checked seeds, and their well-formedness."""

import re

import numpy as np
import pytest

import tc.fastbot
import tc.fastobs
from tc import vocab
from tc.demos import run_episode
from tc.envs import babyai_ids, make_env, reset_quiet
from tc.thoughts import TEMPLATES, BotMismatch, CheckedBot, ThoughtBot, expert_thoughts, random_thought


def run_bot(level: str, seed: int) -> tuple[list[str], bool]:
    """The bot's distinct successive thoughts on one episode, and whether it succeeded."""
    env = make_env(level)
    reset_quiet(env, seed)
    bot, last, thoughts = ThoughtBot(env), None, []
    while True:
        action, thought = bot.step(last)
        if not thoughts or thoughts[-1] != thought:
            thoughts.append(thought)
        _, reward, terminated, truncated, _ = env.step(action)
        last = action
        if terminated or truncated:
            return thoughts, terminated and reward > 0


# Checked by hand against the rendered episodes (and the missions they solve).
EXPECTED = [
    ("BabyAI-GoToLocal-v0", 0, ["go to green ball to complete goto mission"]),
    ("BabyAI-Open-v0", 0, ["explore unseen area", "open yellow door to explore", "explore unseen area",
                           "open green door to complete open mission"]),
    ("BabyAI-Pickup-v0", 1, ["pickup grey box to complete pickup mission"]),
    ("BabyAI-PutNextLocal-v0", 0, ["pickup green ball to complete putnext mission",
                                   "drop green ball to complete putnext mission"]),
    ("BabyAI-UnlockPickup-v0", 0, ["explore unseen area", "pickup green key to unlock the door",
                                   "unlock green door to explore", "drop green key to free hands",
                                   "pickup purple box to complete pickup mission"]),
    ("BabyAI-BlockedUnlockPickup-v0", 0, [
        "explore unseen area", "pickup green key to unlock the door", "unlock green door to explore",
        "drop green key temporary to remove blocking object", "remove blocking object blue ball",
        "pickup green key back", "unlock green door to explore", "drop green key to free hands",
        "pickup purple box to complete pickup mission"]),
    ("BabyAI-BossLevel-v0", 1, ["pickup purple ball to complete pickup mission", "drop purple ball to free hands",
                                "explore unseen area", "open grey door to explore", "explore unseen area",
                                "open red door to complete open mission"]),
    ("BabyAI-BossLevel-v0", 2, ["open grey door to complete open mission",
                                "pickup purple ball to complete putnext mission",
                                "drop purple ball to complete putnext mission"]),
]


@pytest.mark.parametrize("level,seed,expected", EXPECTED, ids=[f"{l}-{s}" for l, s, _ in EXPECTED])
def test_hand_checked_thoughts(level, seed, expected):
    thoughts, success = run_bot(level, seed)
    assert success
    assert thoughts == expected
    assert set(thoughts) <= expert_thoughts()


def test_thoughts_name_the_mission_objects():
    # "open a red door" with a known colour must never come out as a colourless "open door".
    for seed in range(10):
        env = make_env("BabyAI-BossLevel-v0")
        mission = reset_quiet(env, seed)["mission"]
        thoughts, success = run_bot("BabyAI-BossLevel-v0", seed)
        assert success
        for t in thoughts:
            words = t.split()
            assert len(words) + 1 <= vocab.MAX_THOUGHT_LEN
            vocab.encode(t)  # every thought is in the vocabulary
            assert t in expert_thoughts()  # what the safety stage checks its patterns against
            assert not re.search(r"\b(open|unlock|pickup|drop|go to) (door|key|ball|box)\b", t), t
        for color, kind in re.findall(r"pick up the (\w+) (key|ball|box)", mission):
            assert any(f"pickup {color} {kind}" in t for t in thoughts), (mission, thoughts)


def test_random_thoughts_are_well_formed():
    rng = np.random.default_rng(0)
    patterns = [re.compile("^" + re.escape(t).replace(r"\{obj\}", r"\w+ (key|ball|box)")
                           .replace(r"\{door\}", r"\w+ door").replace(r"\{key\}", r"\w+ key") + "$")
                for t in TEMPLATES]
    seen = set()
    for _ in range(500):
        t = random_thought(rng)
        vocab.encode(t)
        matches = [i for i, p in enumerate(patterns) if p.match(t)]
        assert matches and t in expert_thoughts(), t
        seen.update(matches)
    assert len(seen) == len(TEMPLATES)


def test_no_thought_names_a_wall():
    """Re-planning from where an agent took it (oracle evaluation), the bot may hold a Pickup
    subgoal while facing a wall: it keeps its last thought rather than "pickup grey wall"."""
    from minigrid.core.world_object import Ball, Wall
    from minigrid.utils.baby_ai_bot import PickupSubgoal

    from tc.envs import make_env, reset_quiet
    from tc.thoughts import ThoughtBot

    env = make_env("BabyAI-PickupLoc-v0")
    reset_quiet(env, 0)
    bot = ThoughtBot(env)
    sg = PickupSubgoal(bot.bot)
    sg.tc_parent, sg.tc_instr = None, None
    assert bot._act_thought(sg, Wall()) is None
    assert bot._act_thought(sg, Ball("red")) == "remove blocking object red ball"


def _identical(level: str, seed: int, noise_rate: float) -> bool:
    """Whether both bots give the same (action, thought) at every step of an episode with noise."""
    try:
        run_episode(level, seed, noise_rate, bot="check")
    except BotMismatch:
        return False
    except Exception:  # both bots failed the same way (a few levels are beyond the bot)
        pass
    return True


def test_fast_bot_acts_and_thinks_as_minigrids_on_every_level():
    # A sample of what benchmarks/demo_generation.py checks on 1,000 BossLevel seeds. Heavy
    # noise: the bot must also recover the same way from wherever noise took it.
    checked = [(level, seed) for level in babyai_ids() for seed in range(2)]
    checked += [("BabyAI-BossLevel-v0", seed) for seed in range(100, 110)]
    assert [c for c in checked if not _identical(*c, noise_rate=0.1)] == []


def test_fast_bot_remembers_the_same_cells():
    # The fast bot reads what it saw off the observation; minigrid's recomputes the view.
    for seed in range(3):
        env = make_env("BabyAI-BossLevel-v0")
        obs = reset_quiet(env, seed)
        both, last, steps = CheckedBot(env), None, 0
        while True:
            last, _ = both.step(last, obs["image"])
            assert np.array_equal(both.reference.bot.vis_mask, both.fast.bot.vis_mask), (seed, steps)
            obs, _, terminated, truncated, _ = env.step(last)
            steps += 1
            if terminated or truncated:
                break
        assert both.fast.bot.vis_mask.sum() > 49  # it did explore beyond the first view


def test_the_identity_check_catches_another_plan(monkeypatch):
    # Searching with another preference among equally short paths: still a shortest-path
    # bot, but no longer minigrid's, and the check must say so.
    monkeypatch.setattr(tc.fastbot, "_TURN_ORDER", [order[::-1] for order in tc.fastbot._TURN_ORDER])
    assert not all(_identical("BabyAI-BossLevel-v0", seed, 0.0) for seed in range(5))


def test_fast_observation_is_minigrids_on_every_level():
    # Random actions (picking up, dropping, toggling, walking into walls and to the
    # grid's edge) reach views the bot's own episodes may not.
    carried = 0
    for level in babyai_ids():
        env = make_env(level)
        reset_quiet(env, 0)
        u, rng = env.unwrapped, np.random.default_rng(0)
        for t in range(100):
            assert np.array_equal(tc.fastobs.observe(u)["image"], type(u).gen_obs(u)["image"]), (level, t)
            carried += u.carrying is not None
            _, _, terminated, truncated, _ = env.step(int(rng.integers(6)))
            if terminated or truncated:
                break
    assert carried > 0


def test_the_identity_check_catches_another_observation(monkeypatch):
    # A view without occlusion: every cell of it "seen".
    monkeypatch.setattr(tc.fastobs, "_visible", lambda view, size: [True] * (size * size))
    assert not _identical("BabyAI-BossLevel-v0", 0, 0.0)
