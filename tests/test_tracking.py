"""MLflow tracking: runs land where expected, are queryable, and a dead server fails fast."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tc import tracking

BIN = Path(sys.executable).parent  # the venv's bin: mlflow, dvc
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def local_store(tmp_path, monkeypatch):
    """A repository root in tmp_path: the default store is then tmp_path/mlflow.db."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "DVC_EXP_NAME", "DVC_STAGE", "TC_PIPELINE_RUN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # outside any git repository
    (tmp_path / "params.yaml").write_text("train:\n  sg_coef: 2.0\n")
    return tmp_path


def log_training(name: str, params: dict, ckpt: Path) -> str:
    with tracking.start_run(name, params, tags={"agent": name[-2:]}) as run:
        log_fn = tracking.metrics_logger()
        for epoch in range(3):
            log_fn({"loss": 1.0 / (epoch + 1), "val_success": None if epoch % 2 else 0.1 * epoch}, epoch)
        tracking.log_artifacts([ckpt], artifact_path="checkpoint")
        return run.info.run_id


def test_runs_queryable_in_default_sqlite_store(local_store):
    ckpt = local_store / "model.pt"
    ckpt.write_bytes(b"weights")
    # The whole params.yaml, as stages pass it (nested sections, lists, a list of dicts).
    params = yaml.safe_load((REPO / "params.yaml").read_text()) | {"tracking": {"experiment": "tc-test"}}
    tc_id = log_training("train-tc", params, ckpt)
    bc_id = log_training("train-bc", params | {"train": params["train"] | {"sg_coef": 0.0}}, ckpt)
    with tracking.start_run("evaluate", {"evaluate": {"episodes": 4}}, experiment="tc-test"):
        tracking.log_metrics({"success_tc": 0.5, "success_bc": 0.25})

    assert (local_store / "mlflow.db").is_file()
    assert tracking.tracking_uri() == f"sqlite:///{local_store / 'mlflow.db'}"
    runs = mlflow.search_runs(experiment_names=["tc-test"], order_by=["attributes.start_time ASC"])
    assert list(runs["tags.mlflow.runName"]) == ["train-tc", "train-bc", "evaluate"]
    assert runs["tags.pipeline_run"].nunique() == 1  # one family, comparable side by side
    assert set(runs["tags.git_rev"]) == {"unknown"}
    assert list(runs["params.train.sg_coef"][:2]) == [str(params["train"]["sg_coef"]), "0.0"]
    assert runs["params.model.memory_dim"][0] == str(params["model"]["memory_dim"])
    assert runs["params.ood.behavioural_bins"][0] == str(params["ood"]["behavioural_bins"])
    assert runs["metrics.success_tc"].iloc[2] == 0.5

    client = MlflowClient()
    history = client.get_metric_history(tc_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
    assert [m.step for m in client.get_metric_history(bc_id, "val_success")] == [0, 2]  # None skipped
    artifacts = [a.path for a in client.list_artifacts(tc_id, "checkpoint")]
    assert artifacts == ["checkpoint/model.pt"]
    assert Path(client.download_artifacts(tc_id, "checkpoint/model.pt", str(local_store))).read_bytes() == b"weights"
    assert (local_store / "mlruns").is_dir()  # artifacts beside the db, not in some other cwd

    with pytest.raises(FileNotFoundError, match="missing.pt"), tracking.start_run("x", {}):
        tracking.log_artifacts([local_store / "missing.pt"])


def test_pipeline_run_tag_follows_dvc_experiment_and_params(local_store, monkeypatch):
    first = tracking.pipeline_run_id()
    assert first.startswith("unknown-")
    (local_store / "params.yaml").write_text("train:\n  sg_coef: 0.0\n")
    assert tracking.pipeline_run_id() != first  # another config, another family
    monkeypatch.setenv("DVC_EXP_NAME", "sg-zero")
    monkeypatch.setenv("DVC_STAGE", "train@tc")
    tags = tracking.run_tags()
    assert tags["pipeline_run"] == "sg-zero" and tags["dvc_exp_name"] == "sg-zero" and tags["dvc_stage"] == "train@tc"


def test_flatten_names_params_like_dvc():
    assert tracking.flatten({"a": {"b": {"c": 1}, "d": [1, 2]}, "e": "x"}) == {"a.b.c": 1, "a.d": [1, 2], "e": "x"}


def test_unreachable_server_fails_before_work(local_store, monkeypatch, free_port):
    uri = f"http://127.0.0.1:{free_port}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    started = False
    with pytest.raises(tracking.TrackingUnavailableError, match="MLFLOW_TRACKING_URI") as err:
        with tracking.start_run("train-tc", {"train": {"epochs": 1}}):
            started = True
    assert uri in str(err.value) and not started


def test_missing_sqlite_folder_is_a_clear_error(tmp_path):
    with pytest.raises(tracking.TrackingUnavailableError, match="nowhere"):
        tracking.check_tracking(f"sqlite:///{tmp_path / 'nowhere' / 'mlflow.db'}")
    with pytest.raises(tracking.TrackingUnavailableError, match=r"^MLflow store sqlite:// is in memory"):
        tracking.check_tracking("sqlite://")


def test_a_refused_file_store_says_the_way_out(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    try:
        with tracking.start_run("train-tc", {"train": {"epochs": 1}}):
            pass
    except tracking.TrackingUnavailableError as err:  # MLflow 3.17 (the one installed here) refuses them
        assert str(err).endswith("use a database (e.g. sqlite:///mlflow.db) or set MLFLOW_ALLOW_FILE_STORE=true")
    else:
        pytest.skip("this MLflow still takes file stores")


@pytest.fixture
def mlflow_server(tmp_path, serve, free_port):
    """A real `mlflow server` on a free local port; always stopped, with its workers."""
    uri = f"http://127.0.0.1:{free_port}"
    serve("mlflow", [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                     "--host", "127.0.0.1", "--port", str(free_port), "--workers", "1"],
          uri + "/health", timeout=120, cwd=tmp_path)  # ~6 s alone; longer on a shared machine
    return uri


def test_real_tracking_server(local_store, monkeypatch, mlflow_server):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    ckpt = local_store / "model.pt"
    ckpt.write_bytes(b"served weights")
    run_id = log_training("train-tc", {"train": {"sg_coef": 2.0}}, ckpt)

    runs = mlflow.search_runs(experiment_names=[tracking.DEFAULT_EXPERIMENT])
    assert list(runs["run_id"]) == [run_id]
    assert runs["params.train.sg_coef"][0] == "2.0" and runs["tags.agent"][0] == "tc"
    client = MlflowClient(tracking_uri=mlflow_server)
    assert [m.value for m in client.get_metric_history(run_id, "loss")][-1] == pytest.approx(1 / 3)
    assert [a.path for a in client.list_artifacts(run_id, "checkpoint")] == ["checkpoint/model.pt"]
    assert not (local_store / "mlflow.db").exists()  # nothing went to the local default


@pytest.mark.skipif(shutil.which("git") is None, reason="git is needed for dvc exp run")
def test_dvc_exp_run_tags_the_experiment(tmp_path):
    """Under `dvc exp run -n NAME` a stage's run is tagged with NAME, the stage and the commit."""
    (tmp_path / "probe.py").write_text(textwrap.dedent("""
        from tc import tracking
        with tracking.start_run("probe", {"p": {"x": 1}}):
            tracking.log_metrics({"m": 1.0})
        open("out.txt", "w").write("done")
    """))
    stage = {"cmd": "python probe.py", "deps": ["probe.py"], "outs": ["out.txt"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"probe": stage}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "TC_"))}
    env |= {"PATH": f"{BIN}{os.pathsep}{env['PATH']}", "PYTHONPATH": str(REPO), "DVC_NO_ANALYTICS": "1"}
    env |= {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}

    def sh(*cmd: str) -> str:
        out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"{cmd} failed:\n{out.stdout}\n{out.stderr}"
        return out.stdout

    sh("git", "init", "-q")
    sh(str(BIN / "dvc"), "init", "-q")
    (tmp_path / ".gitignore").write_text("mlflow.db\nmlruns/\n")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "init")
    head = sh("git", "rev-parse", "HEAD").strip()
    sh(str(BIN / "dvc"), "exp", "run", "-n", "probe-exp")

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=[tracking.DEFAULT_EXPERIMENT])
    assert len(runs) == 1
    row = runs.iloc[0]
    assert row["tags.dvc_exp_name"] == "probe-exp" and row["tags.pipeline_run"] == "probe-exp"
    assert row["tags.dvc_stage"] == "probe" and row["tags.git_rev"] == head and row["tags.dvc_exp_baseline_rev"] == head
    assert row["params.p.x"] == "1" and row["metrics.m"] == 1.0


def test_a_run_killed_by_sigkill_is_ended_by_the_next_run(local_store):
    # SIGKILL (out of memory, kill -9) leaves no chance to end the run; the next one on this host does.
    code = textwrap.dedent("""
        import os, signal
        from tc import tracking
        with tracking.start_run("train-tc", {"train": {"seed": 1}}) as run:
            print(run.info.run_id, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=local_store, env=env)
    assert proc.returncode == -9
    killed = proc.stdout.split()[0]
    mlflow.set_tracking_uri(tracking.tracking_uri())
    assert MlflowClient().get_run(killed).info.status == "RUNNING"  # what the kill left
    with tracking.start_run("train-tc", {"train": {"seed": 1}}) as run:
        # this process's own run is alive: left RUNNING
        assert tracking.end_orphaned_runs(run.info.experiment_id) == []
    old = MlflowClient().get_run(killed)
    assert old.info.status == "KILLED" and "was gone" in old.data.tags["ended_by"]
    assert MlflowClient().get_run(run.info.run_id).info.status == "FINISHED"
