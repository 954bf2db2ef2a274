"""OOD level sets: difficulty definitions and bins filled with seeds of the right difficulty."""

import pytest
from minigrid.envs.babyai.core.verifier import (
    AfterInstr,
    AndInstr,
    BeforeInstr,
    GoToInstr,
    ObjDesc,
    OpenInstr,
    PickupInstr,
    PutNextInstr,
)

from tc.envs import make_env, reset_quiet
from tc.ood import (
    behavioural_bin,
    bot_solution_length,
    check_bins,
    cognitive_level,
    load_level_sets,
    make_level_sets,
    mission_difficulty,
)

BINS = [25, 75, 125, 175, 225, 275, 325, 375, 425]
LEVELS = list(range(1, 10))


def test_mission_difficulty_counts_objects_and_connectives():
    goto = GoToInstr(ObjDesc("ball", "red"))
    putnext = PutNextInstr(ObjDesc("key"), ObjDesc("box", "blue"))
    assert mission_difficulty(goto) == 1
    assert mission_difficulty(putnext) == 2
    assert mission_difficulty(AndInstr(putnext, OpenInstr(ObjDesc("door")))) == 4
    nested = BeforeInstr(AndInstr(putnext, goto), AndInstr(PickupInstr(ObjDesc("ball")), putnext))
    assert mission_difficulty(nested) == (2 + 1 + 1) + (1 + 2 + 1) + 1
    assert mission_difficulty(AfterInstr(goto, goto)) == 3
    assert cognitive_level(11, LEVELS) == 9 and cognitive_level(3, LEVELS) == 3


def test_behavioural_bin_edges():
    assert [behavioural_bin(n, BINS) for n in (1, 49, 50, 99, 100, 374, 399, 400, 1500)] == [
        25, 25, 75, 75, 125, 375, 375, 425, 425,
    ]  # fmt: skip


def test_bad_bins_are_named():
    with pytest.raises(ValueError, match="evenly spaced"):
        check_bins([25, 75, 150], LEVELS)
    with pytest.raises(ValueError, match="start at length 0"):
        check_bins([75, 125], LEVELS)
    with pytest.raises(ValueError, match="cognitive_levels"):
        check_bins(BINS, [2, 3])


def test_level_sets_hold_seeds_of_the_right_difficulty(tmp_path):
    sets = make_level_sets("BabyAI-BossLevel-v0", 300, 1, 25, BINS, LEVELS, progress=False)
    env = make_env("BabyAI-BossLevel-v0")
    filled = 0
    for b, seeds in sets["behavioural"].items():
        for seed in seeds:
            reset_quiet(env, seed)
            assert behavioural_bin(bot_solution_length(env), BINS) == int(b)
            filled += 1
    for c, seeds in sets["cognitive"].items():
        for seed in seeds:
            reset_quiet(env, seed)
            assert cognitive_level(mission_difficulty(env.unwrapped.instrs), LEVELS) == int(c)
            filled += 1
    assert filled >= 6  # 25 candidates fill the common bins
    # Every bin short of its quota is reported, none hidden.
    for axis in ("behavioural", "cognitive"):
        assert sets["unfilled"][axis] == {k: len(v) for k, v in sets[axis].items() if len(v) < 1}
    assert sets["candidates_scanned"] == 25
    path = tmp_path / "levels.json"
    path.write_text(__import__("json").dumps(sets))
    assert load_level_sets(path)["behavioural"] == sets["behavioural"]


def test_level_sets_stop_early_and_do_not_depend_on_workers():
    kwargs = dict(bins=[25, 75], levels=[1, 2], progress=False)
    one = make_level_sets("BabyAI-BossLevel-v0", 300, 2, 200, workers=1, **kwargs)
    two = make_level_sets("BabyAI-BossLevel-v0", 300, 2, 200, workers=2, **kwargs)
    assert one == two
    assert one["candidates_scanned"] < 200 and not any(one["unfilled"].values())


def test_missing_level_file_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="make_ood_levels"):
        load_level_sets(tmp_path / "nope.json")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="not an OOD level-set file"):
        load_level_sets(tmp_path / "x.json")


def test_a_crashing_bot_is_a_failed_seed_not_a_crash():
    # On this MiniBossLevel seed the minigrid bot trips its own assertion (DropSubgoal).
    env = make_env("BabyAI-MiniBossLevel-v0")
    reset_quiet(env, 300000400)
    assert bot_solution_length(env) is None
