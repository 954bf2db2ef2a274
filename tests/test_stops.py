"""A stage stopped by Ctrl-C (SIGINT to its process group, as a terminal sends it) or SIGTERM (a
scheduler's preemption, ``kill``) ends in one line that says what is kept, stops its workers,
and ends by that signal (tc.params.user_errors)."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from tc.checkpoint import load_checkpoint, save_checkpoint
from tc.demos import generate_demos
from tc.model import Agent, ModelConfig

ROOT = Path(__file__).resolve().parents[1]
LEVEL = "BabyAI-GoToLocal-v0"


@pytest.fixture(scope="module")
def demos_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demos") / "goto_local"
    generate_demos(LEVEL, 0, 8, out, noise_rate=0.0, progress=False)
    return out


def write_params(folder: Path, demos: dict | None = None, evaluate: dict | None = None, **train) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["demos"].update(level=LEVEL, **(demos or {}))
    params["model"].update(image_dim=16, memory_dim=32, instr_dim=16)
    params["train"].update(epochs=1000, episodes_per_epoch=8, batch_size=4, val_episodes=0, device="cpu",
                           checkpoint_interval=2, **train)  # fmt: skip
    params["evaluate"].update(device="cpu", **(evaluate or {}))
    (folder / "params.yaml").write_text(yaml.safe_dump(params))


def start(folder: Path, script: str, *args: str, stdout: int = subprocess.DEVNULL) -> subprocess.Popen:
    """``stages/<script>`` in its own process group, with Ctrl-C's default action (a shell running the
    tests in the background would pass on SIGINT ignored)."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"

    def session() -> None:
        os.setsid()
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    return subprocess.Popen([sys.executable, str(ROOT / "stages" / script), "--params", "params.yaml", *args],
                            cwd=folder, env=env, preexec_fn=session, stdout=stdout, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def processes_in(folder: Path) -> list[int]:
    """The processes working in ``folder``."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and Path(os.readlink(entry / "cwd")) == folder:
                pids.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            pass
    return pids


def state(pid: int) -> str:
    """A process's state letter (Z: ended, not yet reaped); "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def stop_when(proc: subprocess.Popen, ready: Path | Callable[[], bool], signum: int, group: bool, workers: bool,
              timeout: float = 120) -> list[str]:  # fmt: skip
    """Once ``ready`` exists (or, a function, returns True), send ``signum`` to ``proc`` (``group``: to its
    whole process group); once it has ended, its stderr lines from the first that says "stopped by" (before:
    progress bars, warnings and MLflow's log), and then none of its processes (``workers``: more than one) is
    left. They are found by their working folder: torchrun's run in sessions of their own."""
    deadline = time.monotonic() + timeout
    while not (ready() if callable(ready) else ready.exists()):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, f"{ready} did not appear within {timeout} s"
        time.sleep(0.2)
    ours = processes_in(Path(os.readlink(f"/proc/{proc.pid}/cwd")))
    assert proc.pid in ours and (len(ours) > 1) == workers, ours
    (os.killpg if group else os.kill)(proc.pid, signum)
    stderr = proc.communicate(timeout=60)[1]
    assert "Traceback" not in stderr, stderr[-3000:]
    for _ in range(50):  # the workers the stage stopped are gone within a few seconds
        left = [pid for pid in ours if state(pid) not in ("", "Z")]
        if not left:
            break
        time.sleep(0.1)
    assert not left, f"processes left: {left}"
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]
    first = [i for i, line in enumerate(lines) if line.startswith("stopped by")]
    assert first, stderr[-3000:]
    return lines[first[0] :]


def test_ctrl_c_stops_training_in_one_line_that_says_where_it_resumes(tmp_path, demos_dir):
    write_params(tmp_path)
    proc = start(tmp_path, "train.py", "--agent", "tc", "--train", str(demos_dir), "--val", str(demos_dir),
                 "--out", "models/tc", "--metrics", "metrics.json", "--history", "history.csv")  # fmt: skip
    lines = stop_when(proc, tmp_path / "models/tc/last.pt", signal.SIGINT, group=True, workers=False)
    assert proc.returncode == -signal.SIGINT  # as if uncaught: a shell loop over stages stops too
    saved = load_checkpoint(tmp_path / "models/tc/last.pt")["train_state"]["updates"]
    assert lines == [f"stopped by SIGINT; the same command resumes from models/tc/last.pt at update {saved} of 2000"]


def test_sigterm_stops_demo_generation_and_its_workers(tmp_path):
    write_params(tmp_path, {"episodes": 4000, "shard_size": 20, "workers": 2})
    proc = start(tmp_path, "generate_demos.py", "--train-out", "train", "--val-out", "val")
    lines = stop_when(proc, tmp_path / "train/shard-00000.npz", signal.SIGTERM, group=False, workers=True)  # the stage alone
    assert proc.returncode == -signal.SIGTERM
    written = len(list((tmp_path / "train").glob("shard-*.npz")))
    assert lines == [f"stopped by SIGTERM; {written} of the 200 shards of train are written; the same command "
                     f"makes the rest"]  # fmt: skip


def test_ctrl_c_stops_two_training_processes_in_two_lines(tmp_path, demos_dir):
    write_params(tmp_path, nproc=2)
    proc = start(tmp_path, "train.py", "--agent", "bc", "--train", str(demos_dir), "--val", str(demos_dir),
                 "--out", "models/bc", "--metrics", "metrics.json", "--history", "history.csv")  # fmt: skip
    lines = stop_when(proc, tmp_path / "models/bc/last.pt", signal.SIGINT, group=True, workers=True)
    assert proc.returncode == -signal.SIGINT
    # The first process says where training resumes, the launcher that the processes stopped.
    assert len(lines) == 2 and "stopped by SIGINT; so were the 2 training processes" in lines, lines
    assert any(line.startswith("stopped by SIGINT; the same command resumes from models/bc/last.pt") for line in lines)


def test_a_stopped_evaluation_goes_on_from_the_episodes_it_kept(tmp_path):
    for agent in ("tc", "bc"):
        torch.manual_seed(0)
        save_checkpoint(tmp_path / f"{agent}.pt", Agent(ModelConfig(image_dim=16, memory_dim=32, instr_dim=16,
                                                                    use_thoughts=agent == "tc")))  # fmt: skip
    (tmp_path / "whole").mkdir()
    for folder in (tmp_path, tmp_path / "whole"):
        write_params(folder, evaluate={"episodes": 60, "max_steps": 16, "batch_size": 8})
    args = ("--tc", str(tmp_path / "tc.pt"), "--bc", str(tmp_path / "bc.pt"), "--out", "eval.json")
    kept_in = tmp_path / ".eval.json.episodes"
    some_kept = lambda: kept_in.exists() and kept_in.read_text().count("\n") > 20  # noqa: E731
    lines = stop_when(start(tmp_path, "evaluate.py", *args), some_kept, signal.SIGINT, group=True, workers=False)
    kept = kept_in.read_text().count("\n") - 1  # the first line: the inputs
    assert 20 <= kept < 240 and lines == [f"stopped by SIGINT; {kept} episodes are kept in {kept_in.name}; the same "
                                          f"command goes on from them"]  # fmt: skip
    again, whole = (start(folder, "evaluate.py", *args, stdout=subprocess.PIPE)
                    for folder in (tmp_path, tmp_path / "whole"))  # fmt: skip
    said = [proc.communicate(timeout=300) for proc in (again, whole)]
    assert again.returncode == whole.returncode == 0, said
    assert said[0][0].startswith(f"going on from the {kept} episodes kept in {kept_in.name}\n")
    assert (tmp_path / "eval.json").read_text() == (tmp_path / "whole/eval.json").read_text()
    assert not kept_in.exists()


def test_a_stopped_ood_scan_goes_on_from_the_seeds_it_kept(tmp_path):
    (tmp_path / "whole").mkdir()
    for folder in (tmp_path, tmp_path / "whole"):
        write_params(folder)
        params = yaml.safe_load((folder / "params.yaml").read_text())
        params["demos"]["level"] = "BabyAI-BossLevel-v0"  # ~30 ms a seed: time to stop it; cognitive level 9 unfilled
        params["ood"].update(max_candidates=300, workers=2)
        (folder / "params.yaml").write_text(yaml.safe_dump(params))
    kept_in = tmp_path / ".levels.json.episodes"
    some_kept = lambda: kept_in.exists() and kept_in.read_text().count("\n") > 30  # noqa: E731
    proc = start(tmp_path, "make_ood_levels.py", "--out", "levels.json")
    lines = stop_when(proc, some_kept, signal.SIGTERM, group=False, workers=True)
    kept = kept_in.read_text().count("\n") - 1  # the first line: the inputs
    assert 30 <= kept < 300 and lines == [f"stopped by SIGTERM; {kept} episodes are kept in {kept_in.name}; the "
                                          f"same command goes on from them"]  # fmt: skip
    again, whole = (start(folder, "make_ood_levels.py", "--out", "levels.json", stdout=subprocess.PIPE)
                    for folder in (tmp_path, tmp_path / "whole"))  # fmt: skip
    said = [proc.communicate(timeout=300) for proc in (again, whole)]
    assert again.returncode == whole.returncode == 0, said
    assert said[0][0].startswith(f"going on from the {kept} episodes kept in {kept_in.name}\n")
    assert (tmp_path / "levels.json").read_text() == (tmp_path / "whole/levels.json").read_text()
    assert not kept_in.exists() and "scanned 300 seeds" in said[0][0]
