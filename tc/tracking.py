"""MLflow experiment tracking for the pipeline stages.

Every stage that trains or evaluates opens one MLflow run with ``start_run`` inside a
single experiment (default "thought-cloning"). Runs are named after the stage
("train-tc", "train-bc", "evaluate", ...) and carry the tag ``pipeline_run``, shared by
all stages of one pipeline execution, so that TC, BC and e.g. sg_coef variants can be
filtered and compared side by side in the MLflow UI or with ``mlflow.search_runs``.

Where runs go: ``MLFLOW_TRACKING_URI`` when set (e.g. ``http://127.0.0.1:5000`` for a
shared ``mlflow server``), otherwise the SQLite file ``mlflow.db`` in the repository root
(artifacts under ``mlruns/`` beside it). Under DVC the root is ``DVC_ROOT``, which DVC
points at the user's repository even when ``dvc exp run --temp``/``--queue`` runs the
stage in a temporary copy, so no run is lost with that copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow

from tc.params import UserError, flatten, sigterm_unwinds, stops_deferred

DEFAULT_EXPERIMENT = "thought-cloning"
PROBE_TIMEOUT_S = 3.0  # a healthy server answers /health in milliseconds
URI_ENV = "MLFLOW_TRACKING_URI"


class TrackingUnavailableError(UserError, RuntimeError):
    """The tracking store cannot be reached or written; raised before any training starts."""


def repo_root() -> Path:
    """Root of the user's repository: ``DVC_ROOT`` under DVC, else the working directory."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<repo root>/mlflow.db``."""
    return os.environ.get(URI_ENV) or f"sqlite:///{repo_root() / 'mlflow.db'}"


def check_tracking(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise ``TrackingUnavailableError`` quickly when ``uri`` cannot take runs.

    MLflow's HTTP client retries a dead server with backoff for minutes, and only at
    the first log call; probing here turns that into an immediate, explicit error.
    """
    hint = (f"(tracking URI {uri!r}, set by {URI_ENV} or defaulting to sqlite:///<repo>/mlflow.db, <repo> being "
            f"DVC_ROOT or the working directory)")
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
                return
        except urllib.error.HTTPError as e:
            if e.code < 500:  # the server answered (e.g. auth in front of /health): it is up
                return
            reason = f"it answered HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:  # refused, DNS failure, timeout
            reason = f"{getattr(e, 'reason', e)}"
        raise TrackingUnavailableError(
            f"MLflow tracking server unreachable {hint}: {reason}. Start it, e.g. "
            f"`mlflow server --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000`, "
            f"or unset {URI_ENV} to log to the local mlflow.db."
        )
    if uri in ("sqlite://", "sqlite:///:memory:"):
        raise TrackingUnavailableError(f"MLflow store {uri} is in memory: its runs would vanish when the stage ends; "
                                       f"give a file, e.g. sqlite:///mlflow.db")
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.parent.is_dir() or not os.access(db.parent, os.W_OK):
            raise TrackingUnavailableError(f"MLflow SQLite store folder {db.parent} is missing or not writable {hint}")
        if db.exists() and not os.access(db, os.W_OK):
            raise TrackingUnavailableError(f"MLflow SQLite store {db} is read-only {hint}: make it writable "
                                           f"(chmod u+w)")


def git_revision(cwd: Path | None = None) -> str:
    """``git rev-parse HEAD`` of ``cwd`` (default: working directory), or "unknown" outside git."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def pipeline_run_id(rev: str | None = None) -> str:
    """Identifier shared by all stage runs of one pipeline execution.

    The DVC experiment name under ``dvc exp run`` (DVC sets ``DVC_EXP_NAME``); else
    ``TC_PIPELINE_RUN`` when the user sets it; else the git revision plus a digest of
    params.yaml, so the stages of one ``dvc repro`` of one config group together
    (``rev``: the git revision, when the caller has it already).
    """
    if os.environ.get("DVC_EXP_NAME"):
        return os.environ["DVC_EXP_NAME"]
    if os.environ.get("TC_PIPELINE_RUN"):
        return os.environ["TC_PIPELINE_RUN"]
    params = repo_root() / "params.yaml"
    digest = hashlib.sha1(params.read_bytes()).hexdigest()[:8] if params.is_file() else "noparams"
    return f"{(rev or git_revision())[:12]}-{digest}"


def run_tags() -> dict[str, str]:
    """Provenance tags of a run: git revision, pipeline run, and what DVC tells its stages.

    DVC sets DVC_STAGE for every stage, and DVC_EXP_NAME / DVC_EXP_BASELINE_REV (the commit
    the experiment branches from) under ``dvc exp run``, queued and --temp runs included.
    """
    rev = git_revision()
    tags = {"git_rev": rev, "mlflow.source.git.commit": rev, "pipeline_run": pipeline_run_id(rev),
            "host": socket.gethostname(), "pid": str(os.getpid())}
    for env, tag in (
        ("DVC_EXP_NAME", "dvc_exp_name"),
        ("DVC_EXP_BASELINE_REV", "dvc_exp_baseline_rev"),
        ("DVC_STAGE", "dvc_stage"),
    ):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def _experiment_id(name: str, uri: str) -> str:
    """Id of experiment ``name``, created on first use; local stores keep artifacts in <root>/mlruns."""
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = (repo_root() / "mlruns").as_uri() if uri.startswith("sqlite:") else None
    return mlflow.create_experiment(name, artifact_location=location)


@contextlib.contextmanager
def start_run(
    run_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str] | None = None,
    nested: bool = False,
    experiment: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Open an MLflow run named ``run_name`` with ``params`` (flattened) and provenance tags.

    The experiment is ``experiment``, else ``params["tracking"]["experiment"]``, else
    ``MLFLOW_EXPERIMENT_NAME``, else "thought-cloning". The store is probed first: an
    unreachable server raises ``TrackingUnavailableError`` before the caller does any work.
    """
    uri = tracking_uri()
    check_tracking(uri)
    name = (
        experiment
        or (params.get("tracking") or {}).get("experiment")
        or os.environ.get("MLFLOW_EXPERIMENT_NAME")
        or DEFAULT_EXPERIMENT
    )
    all_tags = run_tags() | dict(tags or {})
    # Under `dvc exp run` the experiment's name tells the runs of a sweep apart in the UI's list.
    display = f"{run_name} [{os.environ['DVC_EXP_NAME']}]" if os.environ.get("DVC_EXP_NAME") else run_name
    run = None
    with sigterm_unwinds():
        try:
            # A stop cutting a write to the store in half leaves SQLite locked for the run's end:
            # held until the run is in the store and then ended as KILLED below (so are the writes after).
            with stops_deferred():
                run = _open_run(uri, name, display, nested, all_tags)
                mlflow.log_params(flatten(params))
            yield run
        except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (tc.params.sigterm_unwinds)
            if run is not None:
                _end_run("KILLED", stop)
            raise
        except BaseException as err:
            if run is not None:  # not an outer run when this one could not start
                _end_run("FAILED", err)
            raise
        with stops_deferred():
            mlflow.end_run("FINISHED")


def _open_run(uri: str, name: str, display: str, nested: bool, tags: dict[str, str]) -> mlflow.ActiveRun:
    """Start the run in experiment ``name``; a store that cannot take it is a one-line error."""
    try:
        mlflow.set_tracking_uri(uri)
        experiment_id = _experiment_id(name, uri)
        end_orphaned_runs(experiment_id)
        return mlflow.start_run(run_name=display, experiment_id=experiment_id, nested=nested, tags=tags)
    except Exception as err:  # the store's own errors (SQLAlchemy, MlflowException): read-only, not a database...
        first = _first_line(err)
        if "MLFLOW_ALLOW_FILE_STORE" in str(err):  # MLflow 3's long refusal; its way out is at the end
            first = ("this MLflow refuses file stores: use a database (e.g. sqlite:///mlflow.db) or set "
                     "MLFLOW_ALLOW_FILE_STORE=true")
        raise TrackingUnavailableError(f"MLflow store {uri} cannot take runs: {first}") from err


def _end_run(status: str, err: BaseException) -> None:
    """End the active run as ``status`` on the way out of ``err``; a store that refuses is
    said on ``err`` rather than raised over it: the next run on this host ends the run
    (:func:`end_orphaned_runs`)."""
    try:
        with stops_deferred():
            mlflow.end_run(status)
    except Exception as problem:  # noqa: BLE001 -- e.g. SQLite still locked
        err.add_note(f"the MLflow run could not be marked {status} ({_first_line(problem)}); the next run on this "
                     f"host marks it KILLED")


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__


def end_orphaned_runs(experiment_id: str) -> list[str]:
    """Mark KILLED the runs of this host still RUNNING whose process is gone; returns their ids.

    A SIGKILL (out of memory, ``kill -9``, a lost job) leaves no chance to end a run, so it
    would stay RUNNING in MLflow forever. The next run on the same host ends it. A run whose
    pid now belongs to another live process is left alone.
    """
    client = mlflow.MlflowClient()
    host = socket.gethostname().replace("'", "")
    stale = client.search_runs([experiment_id], f"attributes.status = 'RUNNING' and tags.host = '{host}'")
    ended = []
    for run in stale:
        pid = run.data.tags.get("pid", "")
        if pid.isdigit() and not _alive(int(pid)):
            client.set_tag(run.info.run_id, "ended_by", f"a later run: process {pid} was gone")
            client.set_terminated(run.info.run_id, "KILLED")
            ended.append(run.info.run_id)
    return ended


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log numeric metrics to the active run; None values (e.g. no validation this epoch) are skipped."""
    with stops_deferred():  # a write cut in half would leave SQLite locked for the run's end
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None}, step=step)


def metrics_logger() -> Callable[[dict[str, float], int], None]:
    """The ``log_fn(metrics, step)`` callback the training loop takes, logging to the active run."""
    return lambda metrics, step: log_metrics(metrics, step=step)


def log_artifacts(paths: list[str | Path], artifact_path: str | None = None) -> None:
    """Attach files or folders (checkpoint, figures) to the active run; a missing path is an error."""
    for path in map(Path, paths):
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        elif path.is_file():
            mlflow.log_artifact(str(path), artifact_path=artifact_path)
        else:
            raise FileNotFoundError(f"artifact {path} to log to MLflow does not exist")
