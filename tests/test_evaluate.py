"""Batched evaluation, oracle thoughts, steering, watching, and the `tc` command, on real BabyAI episodes."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tc.checkpoint import save_checkpoint
from tc.cli import main as tc_main
from tc.envs import LevelGenerationError, make_env, reset_quiet
from tc.evaluate import PICKUP, EvaluateConfig, evaluate, steer, summarize
from tc.journal import Journal
from tc.model import Agent, ModelConfig
from tc.ood import bot_solution_length
from tc.thoughts import ThoughtBot
from tc.watch import save_episode, watch

BOSS = "BabyAI-BossLevel-v0"


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_agent(use_thoughts: bool = True) -> Agent:
    torch.manual_seed(0)
    return Agent(ModelConfig(image_dim=16, memory_dim=32, instr_dim=16, use_thoughts=use_thoughts))


def test_bot_mode_solves_what_the_bot_solves():
    seeds = [0, 1, 2, 3, 4]
    eps = evaluate(None, BOSS, seeds, "bot", batch_size=3, progress=False)
    env = make_env(BOSS)
    for ep, seed in zip(eps, seeds):
        reset_quiet(env, seed)
        assert ep.seed == seed and ep.success and ep.length == bot_solution_length(env)
        assert len(ep.thoughts) == len(ep.actions) == ep.length
    assert summarize(eps)["success_rate"] == 1.0


def test_interactions_name_the_requested_object():
    eps = evaluate(None, "BabyAI-PickupDist-v0", [0, 2], "bot", progress=False)
    for ep in eps:
        last = ep.interactions[-1]
        assert ep.success and last.verb == "pickup" and last.requested
        assert ep.actions[last.step] == PICKUP
        assert f"{last.color} {last.type}" in ep.mission


def test_evaluation_is_deterministic_and_independent_of_batching():
    agent, seeds = tiny_agent(), [5, 6, 7, 8, 9]
    # Episode i is halted before its step 3 + 2i: the episodes end at different steps, and with 2
    # rows each freed row starts the next seed while the other is halfway through its episode.
    halt = lambda i, step, *_: step == 3 + 2 * i  # noqa: E731
    passes, act = [], agent.act
    agent.act = lambda *args, **kwargs: passes.append(args[0].shape[0]) or act(*args, **kwargs)
    runs = []
    for b in (2, 2, 5, 1):
        passes.clear()
        runs.append(evaluate(agent, BOSS, seeds, "tc", batch_size=b, max_steps=12, sample_seed=3, progress=False,
                             on_step=halt))  # fmt: skip
        # Episode i takes 4 + 2i passes (the last one halted). Batch 2: episodes 0 and 1 at once,
        # 2 from pass 5 (after 0's 4), 3 from pass 7, 4 from pass 13 to 24 (in groups of 2 seeds,
        # each running to its longest episode, it would be 6 + 10 + 12 passes)
        assert len(passes) == {2: 24, 5: 12, 1: 40}[b] and max(passes) == min(b, 5)
    del agent.act
    assert [e.length for e in runs[0]] == [3, 5, 7, 9, 11] and all(e.halted for e in runs[0])
    for eps in runs[1:]:
        assert [e.actions for e in eps] == [e.actions for e in runs[0]]
        assert [e.thoughts for e in eps] == [e.thoughts for e in runs[0]]
    other = evaluate(agent, BOSS, seeds, "tc", batch_size=2, max_steps=12, sample_seed=4, progress=False)
    assert [e.actions[:3] for e in other] != [e.actions[:3] for e in runs[0]]
    assert all(e.length == 12 and not e.success for e in other)


def test_oracle_mode_acts_on_the_thoughts_of_a_bot_following_the_agent():
    eps = evaluate(tiny_agent(), BOSS, [8, 9], "oracle", batch_size=2, max_steps=15, progress=False)
    env = make_env(BOSS)
    for ep in eps:
        reset_quiet(env, ep.seed)
        bot, expected, last = ThoughtBot(env), [], None
        for a in ep.actions:  # replay: the bot is told the action actually taken
            expected.append(bot.step(last)[1])
            env.step(a)
            last = a
        assert ep.thoughts == expected


def test_oracle_bot_replans_instead_of_ending_the_episode():
    """Seed 18: the untrained agent takes BossLevel where the minigrid bot gives up (step < 60);
    a new bot plans from there, and the episode goes on to its step limit with a thought every step."""
    (ep,) = evaluate(tiny_agent(), BOSS, [18], "oracle", max_steps=60, progress=False)
    assert ep.bot_restarts >= 1 and summarize([ep])["bot_restarts"] == ep.bot_restarts
    assert ep.length == 60 and len(ep.thoughts) == 60 and all(ep.thoughts)


def test_bc_mode_has_no_thoughts_and_modes_are_checked():
    bc = tiny_agent(use_thoughts=False)
    (ep,) = evaluate(bc, BOSS, [1], "bc", max_steps=5, progress=False)
    assert ep.thoughts == [] and ep.length == 5
    with pytest.raises(ValueError, match="needs a Thought Cloning agent"):
        evaluate(bc, BOSS, [1], "tc")
    with pytest.raises(ValueError, match="needs a BC agent"):
        evaluate(tiny_agent(), BOSS, [1], "bc")
    with pytest.raises(ValueError, match="unknown evaluation mode"):
        evaluate(bc, BOSS, [1], "greedy")
    with pytest.raises(ValueError, match="BabyAI-BossLevel-v0"):
        evaluate(None, "BabyAI-BosLevel-v0", [1], "bot")


def test_steering_replaces_the_thought_in_the_chosen_steps():
    thought = "go to red ball to complete goto mission"
    ep = steer(tiny_agent(), BOSS, 3, thought, from_step=2, to_step=6, max_steps=8)
    assert ep.thoughts[2:6] == [thought] * 4
    assert thought not in ep.thoughts[:2] + ep.thoughts[6:]
    with pytest.raises(ValueError, match="banana"):
        steer(tiny_agent(), BOSS, 3, "go to the banana")


def test_watch_writes_gif_and_html(tmp_path):
    ep = watch(None, "BabyAI-GoToObj-v0", 0, "bot")
    assert ep.success and len(ep.frames) == ep.length + 1
    save_episode(ep, tmp_path / "ep.gif")
    save_episode(ep, tmp_path / "ep.html")
    with Image.open(tmp_path / "ep.gif") as gif:
        assert gif.n_frames == len(ep.frames)
    page = (tmp_path / "ep.html").read_text()
    assert ep.mission in page and ep.thoughts[0] in page and page.count("iVBOR") == len(ep.frames)  # PNG base64
    with pytest.raises(ValueError, match="unknown format"):
        save_episode(ep, tmp_path / "ep.mp4")


def test_cli_watch_and_show(tmp_path, capsys):
    tc_main(["watch", "--mode", "bot", "--level", "BabyAI-GoToObj-v0", "--seed", "1", "--out", str(tmp_path / "e.gif")])
    out = capsys.readouterr().out
    assert "go to the yellow key" in out and "success" in out and (tmp_path / "e.gif").is_file()
    with pytest.raises(SystemExit, match="needs --agent"):
        tc_main(["watch", "--seed", "1"])
    from tc.demos import generate_demos

    generate_demos("BabyAI-GoToObj-v0", 0, 2, tmp_path / "demos", noise_rate=0.0)
    tc_main(["show", str(tmp_path / "demos"), "1"])
    assert "go to the yellow key" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="out of range"):
        tc_main(["show", str(tmp_path / "demos"), "5"])


def test_evaluate_config_gives_the_evaluate_arguments():
    cfg = EvaluateConfig(seed=1, episodes=4, batch_size=8, argmax=False, device="cpu", threads=1, max_steps=None,
                         workers=3, cuda_graphs=True)  # fmt: skip
    assert cfg.kwargs() == {"batch_size": 8, "argmax": False, "sample_seed": 1, "max_steps": None, "workers": 3,
                            "cuda_graphs": True}  # fmt: skip
    with pytest.raises(ValueError, match="evaluate.batch_size = '8': expected an int >= 1"):
        EvaluateConfig(batch_size="8")


def test_summarize_counts():
    eps = evaluate(None, "BabyAI-GoToObj-v0", [0, 1], "bot", progress=False)
    s = summarize(eps)
    assert s["episodes"] == 2 and s["success_rate"] == 1.0
    assert s["mean_length"] == np.mean([e.length for e in eps]) and 0 < s["mean_return"] <= 1
    assert s["success_ci_low"] == pytest.approx(0.342, abs=1e-3) and s["success_ci_high"] == 1.0  # 2 of 2


@pytest.mark.parametrize("mode", ["oracle", "tc", "bot"])
def test_fast_evaluation_equals_minigrids_own(mode):
    # fast=True swaps in tc.fastobs and tc.fastbot; an untrained agent wanders off the bot's plan,
    # so the oracle's bot re-plans and gives up (restarts) along the way: every path is compared.
    agent = None if mode == "bot" else tiny_agent()
    seeds = [18, 40, 41, 42, 43]  # BossLevel 18: the bot gives up (see the test above)
    runs = [evaluate(agent, BOSS, seeds, mode, batch_size=3, max_steps=60, progress=False, fast=fast)
            for fast in (True, False)]  # fmt: skip
    fields = lambda e: (e.seed, e.actions, e.thoughts, e.success, e.length, e.bot_restarts, e.interactions)  # noqa: E731
    assert [fields(e) for e in runs[0]] == [fields(e) for e in runs[1]]
    if mode == "oracle":
        assert sum(e.bot_restarts for e in runs[0]) > 0  # the re-planning path ran


@pytest.mark.parametrize("mode", ["oracle", "bc", "bot"])
def test_environments_in_worker_processes_change_nothing(mode):
    # 2 workers over 3 slots (2 + 1), 5 seeds: slots start new episodes as theirs end, in both workers.
    agent = None if mode == "bot" else tiny_agent(use_thoughts=mode != "bc")
    seeds = [18, 40, 41, 42, 43]  # BossLevel 18: the oracle's bot gives up and re-plans
    runs = [evaluate(agent, BOSS, seeds, mode, batch_size=3, max_steps=40, progress=False, workers=w) for w in (1, 2)]
    assert runs[0] == runs[1]  # Rollouts compare field by field: actions, thoughts, interactions, restarts...
    assert sum(e.length for e in runs[0]) > 50


def test_a_failing_environment_worker_names_itself():
    # slot 1 (worker 1 of 2) gets a seed gymnasium refuses; the traceback comes back with the error
    with pytest.raises(RuntimeError, match=r"environment worker 1 failed:(.|\n)*[Ss]eed must be"):
        evaluate(None, BOSS, [0, -1, 1, 2], "bot", batch_size=4, progress=False, workers=2)


def test_a_seed_never_generated_in_a_worker_is_the_same_one_line_error(monkeypatch):
    monkeypatch.setattr("tc.envs.RESET_TIMEOUT_S", 1.0)  # the forked workers inherit it
    with pytest.raises(LevelGenerationError, match="seed 200000192 was not generated"):
        evaluate(None, "BabyAI-SynthS5R2-v0", [200000191, 200000192], "bot", batch_size=2, progress=False, workers=2)


def test_a_stopped_evaluation_goes_on_from_the_episodes_it_kept(tmp_path, capsys):
    agent, seeds = tiny_agent(), [18, 40, 41, 42, 43, 44]  # BossLevel 18: the oracle's bot re-plans
    save_checkpoint(tmp_path / "tc.pt", agent)
    kept_in = tmp_path / ".eval.json.episodes"
    journal = lambda: Journal(tmp_path / "eval.json", __file__, {"--tc": tmp_path / "tc.pt"}, level=BOSS)  # noqa: E731

    def run(some=seeds, **kw):
        return evaluate(agent, BOSS, some, "oracle", batch_size=3, max_steps=30, progress=False, **kw)

    def kept_seeds() -> list[int]:
        return [json.loads(line)["seed"] for line in kept_in.read_text().splitlines()[1:]]

    def stop(i, step, *_):  # Ctrl-C while the fifth episode is under way
        if i == 4 and step == 5:
            raise KeyboardInterrupt
        return False

    whole = run()
    assert sum(e.bot_restarts for e in whole) > 0 and sum(e.length for e in whole) > 100
    with pytest.raises(KeyboardInterrupt), journal() as j:  # seeds 41 and 44 kept: not the first of the list
        run([41, 44], journal=j.part("oracle"))
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt) as stopped, journal() as j:
        run(on_step=stop, journal=j.part("oracle"))
    kept = kept_seeds()
    assert kept[:2] == [41, 44] and 3 <= len(kept) < len(seeds)
    note = f"{len(kept)} episodes are kept in {kept_in}; the same command goes on from them"
    assert stopped.value.__notes__ == [note]
    with kept_in.open("a") as f:
        f.write(kept_in.read_text().splitlines()[1][:40])  # a line cut short: the process died writing it

    played = []
    with pytest.raises(KeyboardInterrupt), journal() as j:  # stopped once done: the file must read back whole
        again = run(on_step=lambda i, step, *_: step == 0 and played.append(seeds[i]), journal=j.part("oracle"))
        raise KeyboardInterrupt
    assert played == [s for s in seeds if s not in kept]
    assert again == whole  # field by field: actions, thoughts, interactions, rewards, restarts
    assert sorted(kept_seeds()) == sorted(seeds)
    with journal() as j:
        assert run(on_step=lambda *_: pytest.fail("a kept episode played again"), journal=j.part("oracle")) == whole
    assert not kept_in.exists()  # the block ended: the stage has written its output
    assert capsys.readouterr().out.splitlines() == [f"going on from the {n} episodes kept in {kept_in}"
                                                    for n in (2, len(kept), len(seeds))]  # fmt: skip

    with pytest.raises(KeyboardInterrupt), journal() as j:
        run(on_step=stop, journal=j.part("oracle"))
    torch.manual_seed(1)
    save_checkpoint(tmp_path / "tc.pt", Agent(agent.cfg))  # other weights: their episodes are not these
    with journal() as j:
        assert j.kept == {}
    said = f"starting afresh: {kept_in} was kept for other inputs (--tc {tmp_path}/tc.pt changed)\n"
    assert capsys.readouterr().out == said
