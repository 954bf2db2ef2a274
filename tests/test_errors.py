"""User errors outside params.yaml (files, flags, input, the tracking store): one line, no traceback."""

import io
import json
import os
import signal
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from tc import tracking
from tc.cli import main as tc_main
from tc.checkpoint import save_checkpoint
from tc.demos import generate_demos, shard_path
from tc.model import Agent, ModelConfig

REPO = Path(__file__).resolve().parents[1]
LEVEL = "BabyAI-GoToObj-v0"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demos_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demos") / "train"
    generate_demos(LEVEL, 0, 3, out, noise_rate=0.0, shard_size=2, progress=False)
    return out


def one_line_error(capsys, exit_info, *fragments: str) -> str:
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and all(f in err for f in fragments), err
    return err


def test_corrupt_resume_checkpoint_names_the_file_and_the_way_out(tmp_path, monkeypatch, capsys, stage_main, demos_dir):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["demos"].update(level=LEVEL, episodes=3, noise_rate=0.0, val_seed=100, val_episodes=1)  # the data's
    params["model"] = {"image_dim": 16, "memory_dim": 32, "instr_dim": 16, "attn_heads": 2}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    generate_demos(LEVEL, 100, 1, tmp_path / "val", noise_rate=0.0, progress=False)
    (tmp_path / "models/tc").mkdir(parents=True)
    (tmp_path / "models/tc/last.pt").write_bytes(b"PK\x03\x04 cut short")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        stage_main("train")(["--agent", "tc", "--train", str(demos_dir), "--val", "val", "--out", "models/tc",
                             "--metrics", "m.json", "--history", "h.csv"])  # fmt: skip
    err = one_line_error(capsys, exit_info, "models/tc/last.pt is not a readable agent checkpoint",
                         "delete it or pass --no-resume")
    assert "weights_only" not in err  # torch's advice would run the file's code


@pytest.mark.parametrize(
    "stage, argv, message",
    [
        ("train", ["--agent", "bc", "--out", "m", "--metrics", "taken", "--history", "h.csv"],
         "--metrics taken is a folder; expected a file there"),
        ("train", ["--agent", "bc", "--out", "params.yaml", "--metrics", "m.json", "--history", "h.csv"],
         "--out params.yaml is a file; expected a folder there"),
        ("evaluate", ["--out", "params.yaml/eval.json"],
         "--out params.yaml/eval.json: params.yaml is a file, not a folder"),
        ("plots", ["--out", "params.yaml"], "--out params.yaml is a file; expected a folder there"),
        ("report", ["--out", "taken"], "--out taken is a folder; expected a file there"),
        ("generate_demos", ["--train-out", "d", "--val-out", "./d"], "--train-out d and --val-out ./d: one folder"),
        ("generate_demos", ["--train-out", "d/val/train", "--val-out", "d/val"], "one folder holds the other"),
    ],
)  # fmt: skip
def test_outputs_that_cannot_be_written_are_refused_before_any_work(tmp_path, monkeypatch, capsys, stage_main, stage,
                                                                    argv, message):  # fmt: skip
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (tmp_path / "taken").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        stage_main(stage)(argv)
    one_line_error(capsys, exit_info, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "taken"]  # nothing made, no mlflow.db


def test_data_of_another_level_is_refused_before_torchrun_starts(tmp_path, monkeypatch, capsys, stage_main, demos_dir):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["nproc"] = 2  # without the check here, each of 2 processes fails, then torchrun's traceback
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        stage_main("train")(["--agent", "bc", "--train", str(demos_dir), "--val", str(demos_dir), "--out", "models/bc",
                             "--metrics", "m.json", "--history", "h.csv"])  # fmt: skip
    one_line_error(capsys, exit_info, f"--train holds {LEVEL} demos, but params.yaml demos.level is "
                                      f"{params['demos']['level']}")


def test_truncated_shard_in_tc_show(tmp_path, capsys, demos_dir):
    copy = tmp_path / "demos"
    copy.mkdir()
    for f in demos_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    shard = shard_path(copy, 0)
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(SystemExit) as exit_info:
        tc_main(["show", str(copy), "0"])
    one_line_error(capsys, exit_info, "corrupt or truncated shard", "shard-00000.npz")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--shard", "3"], "--shard 3: expected i/N with 0 <= i < N"),
        (["--shard", "4/4"], "--shard 4/4: expected i/N"),
        (["--merge"], "has no config.json, so no shard was generated there"),
    ],
)
def test_generate_demos_flags(tmp_path, monkeypatch, capsys, stage_main, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    with pytest.raises(SystemExit) as exit_info:
        stage_main("generate_demos")(argv)
    one_line_error(capsys, exit_info, message)
    assert not (tmp_path / "data").exists()


def test_watch_refuses_an_unknown_format_before_playing(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"--out .*ep\.mp4: unknown format; expected a file ending in \.gif or \.html"):
        tc_main(["watch", "--mode", "bot", "--level", LEVEL, "--seed", "1", "--out", str(tmp_path / "ep.mp4")])
    assert capsys.readouterr().out == ""  # no episode was played and printed


@pytest.mark.parametrize(
    "argv, message",
    [
        (["watch", "--mode", "bot", "--seed", "-5"], "argument --seed: expected >= 0, got -5"),
        (["watch", "--mode", "bot", "--seed", "1", "--fps", "0"], "argument --fps: expected > 0, got 0"),
        (["watch", "--mode", "bot", "--seed", "1", "--fps", "nan"], "argument --fps: expected > 0, got nan"),
        (["watch", "--mode", "bot", "--seed", "1", "--max-steps", "0"], "argument --max-steps: expected >= 1, got 0"),
        (["watch", "--mode", "bot", "--seed", "1", "--agent", "x.pt"], "--agent would be ignored"),
        (["steer", "--agent", "x.pt", "--seed", "1", "--thought", "go", "--from-step", "9", "--to-step", "2"],
         "--to-step 2 must be after --from-step 9"),
    ],
)  # fmt: skip
def test_tc_command_refuses_flags_it_could_not_honour(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        tc_main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_unknown_level(capsys):
    with pytest.raises(SystemExit, match="unknown BabyAI level 'BabyAI-GoToObject-v0'.*Did you mean: BabyAI-GoToObj"):
        tc_main(["watch", "--mode", "bot", "--level", "BabyAI-GoToObject-v0", "--seed", "1"])


def test_default_level_is_the_trained_one(monkeypatch, tmp_path):
    from tc.cli import default_level

    monkeypatch.chdir(tmp_path)
    assert default_level() == "BabyAI-MiniBossLevel-v0"  # no params.yaml: the shipped default
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"demos": {"level": LEVEL}}))
    assert default_level() == LEVEL


def test_interactive_steering_ends_cleanly_on_eof(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "tc.pt", Agent(ModelConfig(image_dim=16, memory_dim=32, instr_dim=16, attn_heads=2)))
    monkeypatch.setattr(sys, "stdin", io.StringIO("go to red ball to complete goto mission\n"))  # then EOF
    tc_main(["steer", "--agent", str(tmp_path / "tc.pt"), "--level", LEVEL, "--seed", "1", "--interactive",
             "--max-steps", "4"])  # fmt: skip
    out = capsys.readouterr().out
    assert "input ended: the agent keeps its own thoughts from here on" in out and "after 4 steps" in out


@pytest.fixture
def store(tmp_path, monkeypatch):
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "DVC_EXP_NAME", "TC_PIPELINE_RUN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_unusable_store_is_one_line(store):
    (store / "mlflow.db").write_text("not a database\n" * 100)
    with pytest.raises(tracking.TrackingUnavailableError) as err:
        with tracking.start_run("train-tc", {}):
            pass
    assert f"MLflow store sqlite:///{store / 'mlflow.db'} cannot take runs" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("how, status", [("sigterm", "KILLED"), ("ctrl-c", "KILLED"), ("error", "FAILED")])
def test_interrupted_runs_do_not_stay_running(store, how, status):
    with pytest.raises((KeyboardInterrupt, ValueError)):
        with tracking.start_run("train-tc", {"train": {"sg_coef": 1.0}}) as run:
            if how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            raise KeyboardInterrupt if how == "ctrl-c" else ValueError("a bug")
    assert mlflow.get_run(run.info.run_id).info.status == status
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored


def test_a_stop_during_a_write_to_the_store_waits_for_it(store, monkeypatch):
    """Ctrl-C in the middle of logging metrics: the write completes (cut in half, it left SQLite
    locked and the run's end failed), then the stop ends the run as KILLED."""
    real_log_metrics = mlflow.log_metrics

    def log_metrics(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # arrives in the middle of the write
        real_log_metrics(*args, **kwargs)

    monkeypatch.setattr(mlflow, "log_metrics", log_metrics)
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)  # whatever pytest was started with
    try:
        with pytest.raises(KeyboardInterrupt):
            with tracking.start_run("train-tc", {}) as run:
                tracking.log_metrics({"val_success": 0.5}, step=1)
    finally:
        signal.signal(signal.SIGINT, handler)
    finished = mlflow.get_run(run.info.run_id)
    assert finished.info.status == "KILLED" and finished.data.metrics == {"val_success": 0.5}


def test_a_run_the_store_cannot_end_is_said_not_raised(store, monkeypatch):
    def end_run(status):
        raise mlflow.exceptions.MlflowException("(sqlite3.OperationalError) database is locked")

    with pytest.raises(KeyboardInterrupt) as stop:
        with tracking.start_run("train-tc", {}):
            monkeypatch.setattr(mlflow, "end_run", end_run)
            raise KeyboardInterrupt
    monkeypatch.undo()
    mlflow.end_run()  # this process's record of the active run
    assert stop.value.__notes__ == ["the MLflow run could not be marked KILLED ((sqlite3.OperationalError) database "
                                    "is locked); the next run on this host marks it KILLED"]  # fmt: skip


def test_run_name_carries_the_dvc_experiment(store, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "sg-sweep-1")
    with tracking.start_run("train-tc sg_coef=1", {}) as run:
        pass
    assert mlflow.get_run(run.info.run_id).data.tags["mlflow.runName"] == "train-tc sg_coef=1 [sg-sweep-1]"


def test_stages_name_a_wrong_or_malformed_input_file(tmp_path, monkeypatch, capsys, stage_main):
    torch.manual_seed(0)
    tiny = {"image_dim": 16, "memory_dim": 32, "instr_dim": 16, "attn_heads": 2}
    save_checkpoint(tmp_path / "bc.pt", Agent(ModelConfig(**tiny, use_thoughts=False)))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    with pytest.raises(SystemExit) as exit_info:  # the BC checkpoint given as TC's
        stage_main("evaluate")(["--tc", "bc.pt", "--bc", "bc.pt"])
    one_line_error(capsys, exit_info, "bc.pt: mode 'tc' needs a Thought Cloning agent")
    (tmp_path / "levels.json").write_text("{not json")
    with pytest.raises(SystemExit) as exit_info:
        stage_main("evaluate_ood")(["--levels", "levels.json", "--tc", "bc.pt", "--bc", "bc.pt"])
    one_line_error(capsys, exit_info, "levels.json: not valid JSON")
    (tmp_path / "train_tc.csv").write_text("epoch,frames\n1,100\n")
    with pytest.raises(SystemExit) as exit_info:
        stage_main("plots")(["--history", "tc=train_tc.csv", "--out", "figures"])
    one_line_error(capsys, exit_info, "train_tc.csv: history CSV lacks columns ['val_success']")
    # Hand-edited or foreign files: a level set with a bad bin, a manifest of another shape,
    # a checkpoint whose weights do not fit its architecture.
    bad_bin = {"env_id": "BabyAI-GoToObj-v0", "behavioural": {"25": ["7"]}, "cognitive": {}}  # a seed as a string
    (tmp_path / "levels.json").write_text(json.dumps(bad_bin))
    with pytest.raises(SystemExit) as exit_info:
        stage_main("evaluate_ood")(["--levels", "levels.json", "--tc", "bc.pt", "--bc", "bc.pt"])
    one_line_error(capsys, exit_info, "levels.json: behavioural: expected a mapping of bins to lists of seeds")
    (tmp_path / "demos").mkdir()
    (tmp_path / "demos/manifest.json").write_text("[]")
    with pytest.raises(SystemExit) as exit_info:
        tc_main(["show", "demos", "0"])
    one_line_error(capsys, exit_info, "demos/manifest.json is not a dataset manifest (no level, first_seed")
    save_checkpoint(tmp_path / "tc.pt", Agent(ModelConfig(**tiny)))
    ckpt = torch.load(tmp_path / "tc.pt", weights_only=True)
    ckpt["model_config"]["memory_dim"] = 64  # weights of memory 32
    torch.save(ckpt, tmp_path / "misfit.pt")
    with pytest.raises(SystemExit) as exit_info:
        stage_main("evaluate")(["--tc", "misfit.pt", "--bc", "bc.pt"])
    one_line_error(capsys, exit_info, "misfit.pt does not fit the TC architecture of this code")
