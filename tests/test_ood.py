"""OOD level sets: difficulty definitions and bins filled with seeds of the right difficulty."""

import json

import minigrid
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

import tc.ood
from tc.envs import make_env, reset_quiet
from tc.journal import Journal
from tc.ood import (
    behavioural_bin,
    bot_solution_length,
    check_bins,
    cognitive_level,
    kept_measure,
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


def test_a_stopped_scan_goes_on_from_the_seeds_it_kept(tmp_path, monkeypatch, capsys):
    level, first, n = "BabyAI-BossLevel-v0", 300, 60
    kwargs = dict(bins=[25, 75, 125, 175, 225, 275], levels=[1, 2, 3], progress=False)  # 275: >= 250 steps, rare
    whole = make_level_sets(level, first, 3, n, **kwargs)
    assert whole["candidates_scanned"] == n
    kept_in = tmp_path / ".levels.json.episodes"
    journal = lambda: Journal(tmp_path / "levels.json", __file__, {}, kept_measure, level=level)  # noqa: E731
    measured, stop_after, measure = [], [15], tc.ood._measure

    def measure_until_stopped(job):
        if len(measured) == stop_after[0]:
            raise KeyboardInterrupt
        measured.append(job[1])
        return measure(job)

    monkeypatch.setattr(tc.ood, "_measure", measure_until_stopped)
    with pytest.raises(KeyboardInterrupt) as stopped, journal() as j:
        make_level_sets(level, first, 3, n, journal=j, **kwargs)
    assert stopped.value.__notes__ == [f"15 episodes are kept in {kept_in}; the same command goes on from them"]
    measured.clear()
    stop_after[0] = n
    with journal() as j:
        assert make_level_sets(level, first, 3, n, journal=j, **kwargs) == whole
    assert measured == list(range(first + 15, first + n))  # exactly the seeds not kept, in order
    assert not kept_in.exists() and capsys.readouterr().out == f"going on from the 15 episodes kept in {kept_in}\n"

    # Kept measures serve other bins (a seed's measure does not depend on them), workers measure the rest.
    measured.clear()
    stop_after[0] = 20
    with pytest.raises(KeyboardInterrupt), journal() as j:
        make_level_sets(level, first, 3, n, journal=j, **kwargs)
    monkeypatch.undo()  # the workers measure with the real function
    other = dict(bins=[25, 75, 125, 175, 225], levels=[1, 2, 3, 4], progress=False)
    with journal() as j:
        resumed = make_level_sets(level, first, 3, n, workers=2, journal=j, **other)
    assert resumed == make_level_sets(level, first, 3, n, **other) and resumed["candidates_scanned"] > 20
    assert capsys.readouterr().out == f"going on from the 20 episodes kept in {kept_in}\n"

    # Records it cannot read: afresh, not a failure on every rerun.
    head = json.dumps(journal().inputs)
    for record, why in (('{"part": "scan", "seed": 300, "bot_length": 3}', "'cognitive_difficulty'"),
                        ('{"part": "scan", "seed": 300, "cognitive_difficulty": true, "bot_length": 3}',
                         "seed 300's record is not a scanned seed's")):  # fmt: skip
        kept_in.write_text(f"{head}\n{record}\n")
        with journal() as j:
            assert j.kept == {} and kept_in.read_text() == f"{head}\n"
        assert capsys.readouterr().out == f"starting afresh: {kept_in} could not be read ({why})\n"

    # A seed kept twice, then a line cut short: the file rewritten holds it once.
    line = '{"part": "scan", "seed": 300, "cognitive_difficulty": 2, "bot_length": 30}'
    kept_in.write_text(f"{head}\n{line}\n{line}\n{line[:20]}")
    with journal() as j:
        assert j.kept == {"scan": {300: (2, 30)}} and kept_in.read_text() == f"{head}\n{line}\n"
    capsys.readouterr()

    # Another minigrid may lay the levels out otherwise: afresh, saying so.
    with pytest.raises(KeyboardInterrupt), journal():
        raise KeyboardInterrupt
    monkeypatch.setattr(minigrid, "__version__", "0.0")
    with journal():
        pass
    said = capsys.readouterr().out
    assert said == f"starting afresh: {kept_in} was kept for other inputs (versions.minigrid changed)\n"
    old = journal().inputs
    old["settings"]["versions.gone"] = "2.0"  # a library then loaded, now not: named too
    kept_in.write_text(json.dumps(old) + "\n")
    with journal():
        pass
    said = capsys.readouterr().out
    assert said == f"starting afresh: {kept_in} was kept for other inputs (versions.gone changed)\n"


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
