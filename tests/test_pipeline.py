"""The DVC pipeline end to end on a micro config, and the plots / report stages' library.

The end-to-end tests copy the repository (tracked and untracked, not ignored files) into a
fresh git repo, shrink params.yaml to a micro config and run the real `dvc repro`: every
stage of dvc.yaml must run and write outputs of the expected content; a training killed
mid-way resumes under `dvc repro` and ends with the weights of an uninterrupted run.
"""

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tc.history import load_history
from tc.params import flatten
from tc.plots import FIGURES, load_ood, write_figures
from tc.stats import paired_difference, wilson_interval
from tc.report import build_report

BIN = Path(sys.executable).parent  # the venv's bin: dvc, python
REPO = Path(__file__).resolve().parents[1]

# Dotted params key -> micro value; applied only where params.yaml has the key.
MICRO = {
    "demos.episodes": 12, "demos.val_episodes": 4, "demos.workers": 1, "demos.shard_size": 6,
    "model.image_dim": 32, "model.memory_dim": 64, "model.instr_dim": 32,
    "train.epochs": 2, "train.episodes_per_epoch": 12, "train.batch_size": 6, "train.recurrence": 5,
    "train.warmup_epochs": 1, "train.lr_halve_epoch": None, "train.stop_tf": 1, "train.val_interval": 2,
    "train.val_episodes": 4, "train.checkpoint_interval": 2, "train.device": "cpu", "train.amp": False,
    "evaluate.episodes": 2, "evaluate.batch_size": 4, "evaluate.max_steps": 16, "evaluate.device": "cpu",
    "ood.episodes_per_bin": 1, "ood.max_candidates": 20, "ood.workers": 1, "ood.behavioural_bins": [25, 125],
    "ood.cognitive_levels": [1, 2],
    "safety.episodes": 2,
    "plots.dpi": 40,
}  # fmt: skip
RUNNING = re.compile(r"Running stage '([^']+)'")
OUT_FIELDS = ("outs", "metrics", "plots")


def overlaps(a: str, b: str) -> bool:
    """Paths equal, or one is a folder holding the other (how DVC links a dep to an out)."""
    a, b = a.rstrip("/"), b.rstrip("/")
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def entry_paths(entries: list) -> list[str]:
    """Paths of a deps/outs/metrics/plots list, whose items are strings or {path: options}."""
    return [e if isinstance(e, str) else next(iter(e)) for e in entries or []]


def expand(stages: dict) -> dict[str, dict]:
    """dvc.yaml stages with `foreach` unrolled: {"train@tc": {...}} with ${key}/${item}/${item.field} substituted."""
    out = {}
    for name, body in stages.items():
        if "foreach" not in body:
            out[name] = body
            continue
        items = body["foreach"]
        for key in items if isinstance(items, (dict, list)) else []:
            text = yaml.safe_dump(body["do"]).replace("${key}", str(key)).replace("${item}", str(key))
            for field, value in (items[key] if isinstance(items, dict) else {}).items():
                text = text.replace("${item.%s}" % field, str(value))
            out[f"{name}@{key}"] = yaml.safe_load(text)
    return out


def descendants(stages: dict[str, dict], start: set[str]) -> set[str]:
    """Stages downstream of ``start`` (exclusive) in the dep/out graph of expanded stages."""
    outs = {n: [p for f in OUT_FIELDS for p in entry_paths(b.get(f))] for n, b in stages.items()}
    found, todo = set(), list(start)
    while todo:
        current = todo.pop()
        for name, body in stages.items():
            hit = any(overlaps(d, o) for d in entry_paths(body.get("deps")) for o in outs[current])
            if hit and name not in found and name not in start:
                found.add(name)
                todo.append(name)
    return found


def users_of(stages: dict[str, dict], key: str) -> set[str]:
    """Stages declaring params ``key`` (or its section) in dvc.yaml."""
    declared = {n: [p.replace(".", "/") for p in b.get("params", []) if isinstance(p, str)] for n, b in stages.items()}
    return {n for n, params in declared.items() if any(overlaps(p, key.replace(".", "/")) for p in params)}


@pytest.fixture(scope="module")
def micro_repo(tmp_path_factory):
    """A git + DVC copy of the repository with a micro config and the runnable stages."""
    root = tmp_path_factory.mktemp("pipeline") / "repo"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    for rel in filter(None, listed.split("\0")):
        if rel != "dvc.lock" and (REPO / rel).is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, root / rel)

    params = yaml.safe_load((root / "params.yaml").read_text())
    for dotted, value in MICRO.items():
        section, key = dotted.split(".")
        if key in params.get(section, {}):
            params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stages = expand(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])
    for name, body in stages.items():
        script = re.search(r"python\s+(\S+\.py)", body["cmd"]).group(1)
        assert (root / script).is_file(), f"stage {name}: its script {script} does not exist"

    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_", "TC_"))}
    env |= {"PATH": f"{BIN}{os.pathsep}{env['PATH']}", "PYTHONPATH": str(root), "DVC_NO_ANALYTICS": "1"}
    env |= {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}

    def sh(*cmd: str) -> str:
        out = subprocess.run(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             timeout=600)  # fmt: skip
        assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-6000:]}"
        return out.stdout

    sh("git", "init", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "micro pipeline")
    return root, sh, stages, env


def repro(sh) -> set[str]:
    """Run `dvc repro`; the names of the stages it ran."""
    return set(RUNNING.findall(sh("dvc", "repro")))


def set_param(root: Path, dotted: str, value) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    section, key = dotted.split(".")
    params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def check_reports(root: Path) -> None:
    """eval.json, ood.json and safety.json hold every mode / bin / behaviour with the episodes asked for."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    ev = json.loads((root / "reports/metrics/eval.json").read_text())
    assert sorted(ev) == ["bc", "bot", "oracle", "oracle_minus_tc", "tc", "tc_minus_bc"]
    for mode in ("bc", "bot", "oracle", "tc"):
        row = ev[mode]
        assert row["episodes"] == params["evaluate"]["episodes"] and 0 <= row["success_rate"] <= 1, (mode, row)
        assert row["success_ci_low"] <= row["success_rate"] <= row["success_ci_high"], (mode, row)
    for a, b in (("tc", "bc"), ("oracle", "tc")):
        d = ev[f"{a}_minus_{b}"]
        assert d["difference"] == pytest.approx(ev[a]["success_rate"] - ev[b]["success_rate"])
        assert d["ci_low"] <= d["difference"] <= d["ci_high"] and d["episodes"] == params["evaluate"]["episodes"]

    levels = json.loads((root / "data/ood/levels.json").read_text())
    ood = json.loads((root / "reports/metrics/ood.json").read_text())
    for axis in ("behavioural", "cognitive"):
        assert sorted(ood[axis]) == sorted(levels[axis]), axis
        for b, seeds in levels[axis].items():
            assert sorted(ood[axis][b]) == ["bc", "oracle", "tc"] + (["tc_minus_bc"] if seeds else []), (axis, b)
            assert all(ood[axis][b][m]["episodes"] == len(seeds) for m in ("bc", "oracle", "tc")), (axis, b)

    safety = json.loads((root / "reports/metrics/safety.json").read_text())
    names = [b["name"] for b in params["safety"]["behaviours"]]
    assert sorted(safety) == sorted(names + ["fads", "no_intervention"])
    assert safety["no_intervention"]["episodes"] == safety["fads"]["episodes"] == params["safety"]["episodes"]
    for name in names:
        row = safety[name]
        assert row.pop("episodes") == params["safety"]["episodes"]
        changes = {k: row.pop(k) for k in list(row) if "_change" in k}  # with minus without: -1..1
        assert all(isinstance(v, float) and 0 <= v <= 1 for v in row.values()), row
        assert all(isinstance(v, float) and -1 <= v <= 1 for v in changes.values()), changes
        assert row["shown_with_ci_low"] <= row["shown_with"] <= row["shown_with_ci_high"], row


def test_repro_runs_everything_then_nothing_then_only_downstream(micro_repo):
    root, sh, stages, _ = micro_repo
    assert repro(sh) == set(stages)
    for name, body in stages.items():
        for path in (p for f in OUT_FIELDS for p in entry_paths(body.get(f))):
            assert (root / path).exists(), f"stage {name} did not write {path}"
    check_reports(root)

    assert repro(sh) == set(), "a second `dvc repro` with nothing changed must run no stage"
    assert "up to date" in sh("dvc", "status")

    # Two params (seeds, plots.dpi) that rerun the fewest stages: one whose stages have no
    # downstream stage (e.g. plots.dpi), one whose stages have some (else the next one).
    params = flatten(yaml.safe_load((root / "params.yaml").read_text()))
    candidates = []
    for key in (k for k in params if k.endswith(".seed") or k == "plots.dpi"):
        users = users_of(stages, key)
        downstream = descendants(stages, users)
        if users:
            candidates.append((len(users | downstream), bool(downstream), key))
    candidates.sort()
    chosen = candidates[:1] + ([c for c in candidates if c[1]][:1] or candidates[1:2])
    assert chosen, f"no param of {sorted(params)} is used by the stages {sorted(stages)}"
    for *_, key in chosen:
        set_param(root, key, params[key] + 1)
        changed = users_of(stages, key)
        ran = repro(sh)
        print(f"{key} changed: ran {sorted(ran)}")
        assert changed <= ran, f"{key} changed: stages {changed} using it must rerun, ran {ran}"
        assert ran <= changed | descendants(stages, changed), f"{key} changed: ran {ran}, beyond its downstream"
        assert repro(sh) == set()


def train_state(path: Path) -> dict | None:
    """The resume position and settings saved in a last.pt (None while it does not exist)."""
    if not path.is_file():
        return None
    ts = torch.load(path, weights_only=True)["train_state"]
    return {"epoch": ts["epoch"], "updates": ts["updates"], "sg_coef": ts["train_config"]["sg_coef"]}


def test_killed_training_resumes_under_dvc_repro(micro_repo):
    """A settings change starts afresh over the persisted last.pt; a kill keeps the tracked reports and
    ends the MLflow run as KILLED; `dvc repro` then resumes and gets an uninterrupted run's weights."""
    root, sh, stages, env = micro_repo
    repro(sh)  # up to date (after the test above) or a full first run
    report_before = (root / "reports/metrics/train_tc.json").read_text()
    set_param(root, "train.sg_coef", 1.0)  # TC only: BC must stay up to date
    set_param(root, "train.checkpoint_interval", 1)  # speed-only: reruns nothing by itself
    assert "train@bc" not in sh("dvc", "status", "train@bc")
    set_param(root, "train.episodes_per_epoch", 48)  # 8 updates an epoch: time to be killed mid-way
    log_path = root / "killed.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["dvc", "repro", "train@tc"], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        last = root / "models/tc/last.pt"
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            state = train_state(last)
            if state and state["sg_coef"] == 1.0 and state["updates"] >= 1:
                os.killpg(proc.pid, signal.SIGTERM)  # dvc and the stage, as a terminal's kill would
                break
            time.sleep(0.05)
        proc.wait(timeout=120)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # dvc may end first: the stage saves last.pt on its way out
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
    killed_at = train_state(last)
    assert proc.returncode != 0 and killed_at["sg_coef"] == 1.0, log_path.read_text()[-3000:]
    assert "starting afresh" in log_path.read_text()  # the persisted last.pt had sg_coef 2
    assert killed_at["epoch"] < 2 or killed_at["updates"] < 16, "training ended before the kill"
    assert (root / "reports/metrics/train_tc.json").read_text() == report_before  # kept, not deleted
    with sqlite3.connect(root / "mlflow.db") as db:
        statuses = dict(db.execute("select name, status from runs order by start_time"))
    assert "RUNNING" not in statuses.values() and statuses["train-tc sg_coef=1"] == "KILLED", statuses

    out = sh("dvc", "repro", "train@tc")
    assert f"resuming from models/tc/last.pt at epoch {killed_at['epoch'] + 1}, update {killed_at['updates']}" in out
    sh("python", "stages/train.py", "--params", "params.yaml", "--agent", "tc", "--out", "uninterrupted",
       "--metrics", "uninterrupted.json", "--history", "uninterrupted.csv")  # fmt: skip
    resumed = torch.load(last, weights_only=True)["model"]
    whole = torch.load(root / "uninterrupted/last.pt", weights_only=True)["model"]
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_paper_params_have_the_same_keys():
    small = flatten(yaml.safe_load((REPO / "params.yaml").read_text()))
    paper = flatten(yaml.safe_load((REPO / "params-paper.yaml").read_text()))
    assert sorted(small) == sorted(paper), "params-paper.yaml must mirror params.yaml's keys"
    lite = flatten(yaml.safe_load((REPO / "params-gpu.yaml").read_text()))  # copied over params.yaml too (README)
    assert sorted(small) == sorted(lite), "params-gpu.yaml must mirror params.yaml's keys"
    assert paper["demos.episodes"] == 1_000_000 and paper["model.memory_dim"] == 2048
    assert paper["train.batch_size"] == 180 and paper["train.recurrence"] == 80
    assert paper["safety.behaviours"] == small["safety.behaviours"]  # same definitions, only the scale differs
    assert paper["train.sort_window"] == 1  # the paper's random batches
    # the paper's run, stopped early: only the budget and the evaluation sizes differ
    budget = {"demos.episodes", "train.epochs", "train.val_interval", "ood.episodes_per_bin", "ood.max_candidates",
              "safety.episodes", "train.sort_window"}  # fmt: skip
    assert {k for k in paper if lite[k] != paper[k]} == budget
    assert lite["train.epochs"] * lite["train.episodes_per_epoch"] <= lite["demos.episodes"]


def write_history(path: Path, rows: list[dict]) -> None:
    columns = list(rows[0])
    lines = [",".join(columns)] + [",".join("" if r[c] is None else str(r[c]) for c in columns) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def cell(rate: float | None, episodes: int) -> dict:
    low, high = wilson_interval(round(rate * episodes), episodes) if episodes else (None, None)
    return {"success_rate": rate, "episodes": episodes, "success_ci_low": low, "success_ci_high": high}


def test_figures_and_report_from_partial_inputs(tmp_path):
    plots_dir, metrics_dir, figures = tmp_path / "plots", tmp_path / "metrics", tmp_path / "figures"
    plots_dir.mkdir()
    metrics_dir.mkdir()
    ci = {"val_success_ci_low": None, "val_success_ci_high": None, "val_episodes": None}
    write_history(plots_dir / "train_tc.csv", [
        {"epoch": 1, "frames": 900, "val_success": None, "train_loss": 3.0, "val_thought_acc": None, **ci},
        {"epoch": 2, "frames": 1800, "val_success": 0.25, "train_loss": 2.0, "val_thought_acc": 0.5, **ci},
        {"epoch": 3, "frames": 2700, "val_success": 0.5, "train_loss": 1.5, "val_thought_acc": 0.6,
         "val_success_ci_low": 0.3, "val_success_ci_high": 0.7, "val_episodes": 20},
    ])  # fmt: skip
    diff = paired_difference([1, 1, 1, 0], [1, 0, 1, 0])
    ood = {"behavioural": {"175": {"tc": cell(0.75, 4), "bc": cell(0.5, 4), "tc_minus_bc": diff},
                           "25": {"tc": cell(None, 0)}},
           "cognitive": {"5": {"oracle": cell(1.0, 2) | {"mean_length": 40.0}}}}  # fmt: skip
    (metrics_dir / "ood.json").write_text(json.dumps(ood))
    (metrics_dir / "eval.json").write_text(json.dumps({"tc": cell(0.5, 100), "bc": cell(0.25, 100),
                                                       "tc_minus_bc": paired_difference([1] * 50 + [0] * 50,
                                                                                        [1] * 25 + [0] * 75)}))
    safety = {"pickup_balls": {"shown_without": 0.375, "shown_with": 0.0}, "fads": {"score": 0.9}}
    (metrics_dir / "safety.json").write_text(json.dumps(safety))

    paths = write_figures({"tc": plots_dir / "train_tc.csv", "bc": plots_dir / "train_bc.csv"},
                          metrics_dir / "ood.json", figures, dpi=30)  # fmt: skip
    assert sorted(p.name for p in paths.values()) == sorted(FIGURES.values())
    for p in paths.values():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in figures.iterdir() if p.name.startswith(".")]  # no temp file left
    assert load_history(plots_dir / "train_tc.csv")["val_success"][1] == 0.25

    behaviours = [{"name": "pickup_balls", "thought": "ball", "event": "pickup|drop:ball"}]  # events: from params
    text = build_report({"demos": {"episodes": 12}, "train": {"sg_coef": 2.0}, "safety": {"behaviours": behaviours}},
                        metrics_dir, plots_dir)  # fmt: skip
    assert "| TC | 50.0 [30.0, 70.0] (20) | 2700 |" in text  # best validation success, its interval and where
    assert "train_bc.csv` does not exist" in text and "train_tc.json` does not exist" in text
    assert "| pickup_balls | 0.375 | 0 | pickup\\|drop:ball | 37.1 | 0.53 |" in text  # ours next to the paper's
    assert "| pickup_balls | - | 37.5 | 0.0 | - | - | - | - | - | 37.1 -> 0.53 |" in text  # the readable table
    assert "|  | score |\n|---|---|\n| fads | 0.9 |" in text  # an unrelated row: a table of its own
    # ours with intervals next to the paper's; a 4-episode bin cannot tell the agents apart
    assert "| behavioural | 175 | 75.0 [30.1, 95.4] (4) | 50.0 [15.0, 85.0] (4) | - | +25.0 [" in text
    assert "no difference | 82 | 64 |" in text
    assert "| behavioural | 25 | - (0) |" in text
    assert "| demos.episodes | 12 | 1000000 |" in text
    assert "| tc | 50.0 [40.4, 59.6] | 100 |" in text
    assert "| tc - bc | +25.0 [+16.3, +33.1] ahead | 100 | 25 | 0 |" in text  # 100 paired seeds do


def test_bad_inputs_name_the_file(tmp_path):
    bad = tmp_path / "ood.json"
    bad.write_text(json.dumps({"behavioural": {"25": {"tc": {"success_rate": 75, "episodes": 4}}}}))
    with pytest.raises(ValueError, match=r"ood\.json: behavioural\.25\.tc"):
        load_ood(bad)
    bad.write_text(json.dumps({"behavioral": {}}))
    with pytest.raises(ValueError, match="top level"):
        load_ood(bad)
    csv = tmp_path / "train_tc.csv"
    csv.write_text("epoch,frames\n1,100\n")
    with pytest.raises(ValueError, match=r"train_tc\.csv.*val_success"):
        load_history(csv)
    csv.write_text("epoch,frames,val_success\n1,100,high\n")
    with pytest.raises(ValueError, match=r"train_tc\.csv: non-numeric"):
        load_history(csv)
