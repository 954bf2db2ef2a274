"""The ``tc`` command: look at what an agent (or the bot) does and thinks.

    tc watch  [--agent CKPT] --seed S [--mode tc|bc|oracle|bot] --out episode.gif|episode.html
    tc steer  --agent CKPT --seed S (--thought "go to red ball to complete goto mission" | --interactive) [--out F]
    tc show   DEMO_DIR EPISODE
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tc import vocab
from tc.demos import DemosConfig, format_episode, load_demos
from tc.envs import ACTION_NAMES
from tc.evaluate import MODES, Rollout, evaluate, load_agent_for, steer
from tc.params import load_configs, user_errors
from tc.watch import FORMATS, save_episode, watch


def default_level(params: str | Path = "params.yaml") -> str:
    """The level the pipeline trains on: demos.level of ./params.yaml, else DemosConfig's default."""
    if not Path(params).is_file():
        return DemosConfig().level
    with user_errors():
        return load_configs(params, demos=DemosConfig)[1].demos.level


def _load(path: str | None, mode: str = "tc"):
    """The agent for ``mode``: none for the bot, else the checkpoint (a TC/BC mismatch is an error)."""
    if mode == "bot":
        return None
    if path is None:
        sys.exit(f"error: mode {mode!r} needs --agent CHECKPOINT (only --mode bot runs without one)")
    return load_agent_for(path, mode)


def _print(ep: Rollout) -> None:
    """The episode as text: one line per run of steps under the same thought (as `tc show`)."""
    print(f"seed {ep.seed}: {ep.mission}")
    thoughts = ep.thoughts or [""] * len(ep.actions)  # BC: one run
    start = 0
    for t in range(1, len(ep.actions) + 1):
        if t == len(ep.actions) or thoughts[t] != thoughts[start]:
            span = f"t={start}" if t - start == 1 else f"t={start}-{t - 1}"
            print(f"{span}: {thoughts[start]}  actions [{', '.join(ACTION_NAMES[a] for a in ep.actions[start:t])}]")
            start = t
    end = "halted by the intervention" if ep.halted else ("success" if ep.success else "failure")
    print(f"{end} after {ep.length} steps, return {ep.reward:.3f}" + (f" (the oracle bot re-planned {ep.bot_restarts}x)" if ep.bot_restarts else ""))


class Asker:
    """Interactive steering: show the agent's thought, read a replacement (empty line keeps it).

    When the input ends (EOF, e.g. Ctrl-D or a file of thoughts used up), the agent keeps
    its own thoughts for the rest of the episode.
    """

    def __init__(self):
        self.ended = False

    def __call__(self, _episode: int, step: int, proposed: str) -> str | None:
        while not self.ended:
            try:
                line = input(f"step {step} agent thinks: {proposed!r}\n  your thought (Enter keeps it): ").strip()
            except EOFError:
                self.ended = True
                print("\ninput ended: the agent keeps its own thoughts from here on")
                break
            if not line:
                return None
            try:
                vocab.encode(line)
                return line
            except ValueError as err:
                print(f"  {err}; known words: {' '.join(vocab.WORDS[3:])}")
        return None


def _bounded(kind: type, low: float, *, above: bool = False):
    """An argparse type: ``kind`` >= ``low`` (> with ``above``); argparse reports a bad value in one line."""

    def parse(text: str):
        value = kind(text)
        if not (value > low if above else value >= low):  # written so that nan fails too
            raise argparse.ArgumentTypeError(f"expected {'>' if above else '>='} {low}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value"
    return parse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tc", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def episode_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--agent", help="checkpoint (models/tc/best.pt, models/bc/best.pt)")
        p.add_argument("--level", help="BabyAI env id (default: demos.level of ./params.yaml, the trained level)")
        p.add_argument("--seed", type=_bounded(int, 0), required=True)
        p.add_argument("--sample", action="store_true", help="sample actions instead of taking the most likely one")
        p.add_argument("--max-steps", type=_bounded(int, 1), help="cap on the episode length (default: the level's)")
        p.add_argument("--out", help=f"write the episode as {' or '.join(FORMATS)}")
        p.add_argument("--fps", type=_bounded(float, 0, above=True), default=4)

    w = sub.add_parser("watch", help="run one episode and print / render it")
    episode_args(w)
    w.add_argument("--mode", choices=MODES, default="tc")
    s = sub.add_parser("steer", help="run one TC episode acting on your thought")
    episode_args(s)
    s.add_argument("--thought", help="the thought to impose, e.g. 'go to red ball to complete goto mission'")
    s.add_argument("--from-step", type=_bounded(int, 0), default=0)
    s.add_argument("--to-step", type=_bounded(int, 1), help="last steered step + 1 (default: to the end)")
    s.add_argument("--interactive", action="store_true", help="ask for a thought at every step")
    d = sub.add_parser("show", help="print one episode of a demo dataset with its thoughts")
    d.add_argument("demo_dir")
    d.add_argument("episode", type=int)
    args = parser.parse_args(argv)

    with user_errors():
        try:
            if args.command == "show":
                print(format_episode(load_demos(args.demo_dir), args.episode))
                return
            ep = run(parser, args)
        except (ValueError, IndexError) as err:  # a bad thought, seed, episode index or checkpoint kind
            sys.exit(f"error: {err}")
    _print(ep)
    if args.out is not None:
        print(f"wrote {args.out}")


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Rollout:
    """The episode of `watch` or `steer`, written to --out when given."""
    level = args.level or default_level()
    render = args.out is not None
    if render and Path(args.out).suffix.lower() not in FORMATS:  # before playing a whole episode
        raise ValueError(f"--out {args.out}: unknown format; expected a file ending in {' or '.join(FORMATS)}")
    if args.command == "watch":
        if args.mode == "bot" and args.agent is not None:
            parser.error("watch: --mode bot plays the expert; --agent would be ignored (drop one of them)")
        agent = _load(args.agent, args.mode)
        if render:
            ep = watch(agent, level, args.seed, args.mode, argmax=not args.sample, max_steps=args.max_steps)
        else:
            (ep,) = evaluate(agent, level, [args.seed], args.mode, batch_size=1, argmax=not args.sample,
                             max_steps=args.max_steps, progress=False)  # fmt: skip
    else:
        if (args.thought is None) == (not args.interactive):
            parser.error("steer: give exactly one of --thought TEXT or --interactive")
        if args.to_step is not None and args.to_step <= args.from_step:
            parser.error(f"steer: --to-step {args.to_step} must be after --from-step {args.from_step}")
        ep = steer(_load(args.agent), level, args.seed, Asker() if args.interactive else args.thought,
                   from_step=args.from_step, to_step=args.to_step, argmax=not args.sample,
                   render=render, max_steps=args.max_steps)  # fmt: skip
    if render:
        save_episode(ep, args.out, fps=args.fps, title=f"{level} seed {args.seed} ({args.command})")
    return ep


if __name__ == "__main__":
    main()
