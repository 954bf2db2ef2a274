"""The seed-sweep report on a real DVC experiment queue (a one-stage repository: seconds, not a pipeline run)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tc.sweep import aggregate, experiment_records

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# A stand-in for the evaluate stage: success rates that depend on the seed (and on lr) as eval.json would.
STAGE = """import json, yaml
p = yaml.safe_load(open("params.yaml"))["train"]
tc, bc = 0.3 + 0.01 * p["seed"] + p["lr"], 0.2 + 0.02 * p["seed"]
json.dump({"tc": {"success_rate": tc}, "bc": {"success_rate": bc}, "tc_minus_bc": {"difference": tc - bc}},
          open("eval.json", "w"))
"""


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_"))}
    env |= {"PATH": f"{BIN}{os.pathsep}{env['PATH']}", "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip

    def sh(*cmd):
        out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"{cmd}: {out.stdout[-3000:]}{out.stderr[-3000:]}"
        return out.stdout

    (root / "stage.py").write_text(STAGE)
    (root / "params.yaml").write_text(yaml.safe_dump({"train": {"seed": 1, "lr": 0.0, "threads": 1}}))
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"evaluate": {
        "cmd": "python stage.py", "deps": ["stage.py"], "params": ["train.seed", "train.lr", "train.threads"],
        "metrics": [{"eval.json": {"cache": False}}]}}}))  # fmt: skip
    sh("git", "init", "-q")
    sh("dvc", "init", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "init")
    # the README's sweep: a queue over seeds, twice (lr 0 and lr 0.1), one run differing in a speed setting only
    sh("dvc", "exp", "run", "--queue", "-S", "train.seed=1,2,3")
    sh("dvc", "exp", "run", "--queue", "-S", "train.seed=1,2", "-S", "train.lr=0.1")
    sh("dvc", "exp", "run", "--queue", "-S", "train.seed=4", "-S", "train.threads=2")
    sh("dvc", "exp", "run", "--run-all", "-j", "1")
    return root, sh


def test_sweep_groups_runs_by_setting_and_aggregates_over_seeds(swept):
    root, sh = swept
    records = experiment_records(json.loads(sh("dvc", "exp", "show", "--json")))
    assert sorted((r["params"]["train.seed"], r["params"]["train.lr"]) for r in records) == [
        (1, 0.0), (1, 0.1), (2, 0.0), (2, 0.1), (3, 0.0), (4, 0.0)]  # fmt: skip  # 6 runs; queued-only none
    groups = {g["setting"]["train.lr"]: g for g in aggregate(records, metrics=("eval.tc.success_rate",
                                                                              "eval.tc_minus_bc.difference"))}
    assert set(groups) == {0.0, 0.1}  # train.threads is a speed setting: seed 4 joins lr 0
    base = groups[0.0]
    assert sorted(r["train.seed"] for r in base["runs"]) == [1, 2, 3, 4]
    tc = base["metrics"]["eval.tc.success_rate"]
    assert tc["runs"] == 4 and tc["mean"] == pytest.approx(0.325) and tc["ci_low"] < 0.325 < tc["ci_high"]
    diff = base["metrics"]["eval.tc_minus_bc.difference"]
    assert diff["mean"] == pytest.approx(0.075) and diff["min"] == pytest.approx(0.06)

    out = root / "reports" / "sweep.md"
    subprocess.run([sys.executable, str(REPO / "experiments" / "sweep_report.py"), "--out", str(out)], cwd=root,
                   env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO)},
                   check=True, capture_output=True)  # fmt: skip
    text = out.read_text()
    assert "## train.lr=0.0" in text and "4 runs:" in text and "| eval.tc.success_rate | 32.5 |" in text
    assert json.loads(out.with_suffix(".json").read_text())[0]["metrics"]["eval.tc.success_rate"]["runs"] in (2, 4)


def test_sweep_report_without_experiments_says_so(tmp_path):
    empty = tmp_path / "exp.json"
    empty.write_text(json.dumps([{"rev": "workspace", "data": {"metrics": {"eval.json": {"error": {}}}}}]))
    out = subprocess.run([sys.executable, str(REPO / "experiments" / "sweep_report.py"), "--exp-json", str(empty),
                          "--out", str(tmp_path / "sweep.md")], capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 1 and out.stderr.strip() == "error: no experiment with metrics found: run the sweep first (see --help)"
