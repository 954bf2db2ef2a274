"""dvc.yaml against the code: each stage's code deps are what its script imports, its params
exactly the settings that change its outputs, and its outputs survive a failed or killed run."""

import ast
import dataclasses
from pathlib import Path

import pytest
import yaml

from tc.demos import DemosConfig
from tc.evaluate import EvaluateConfig
from tc.model import ModelConfig
from tc.ood import OodConfig
from tc.params import params_keys
from tc.plots import PlotsConfig
from tc.safety import SafetyConfig
from tc.train import TrainConfig

from test_pipeline import REPO, entry_paths, expand

STAGES = expand(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])


def script_of(body: dict) -> Path:
    return REPO / next(w for w in body["cmd"].split() if w.endswith(".py"))


def imported_modules(path: Path) -> set[Path]:
    """The files of package ``tc`` that ``path`` imports, directly or through other tc modules."""
    found: set[Path] = set()
    todo = [path]
    while todo:
        tree = ast.parse(todo.pop().read_text())
        for node in ast.walk(tree):  # imports inside functions count: they run too
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                if name != "tc" and not name.startswith("tc."):
                    continue
                parts = name.split(".")
                file = REPO / Path(*parts).with_suffix(".py") if len(parts) > 1 else REPO / "tc/__init__.py"
                if file.is_file() and file not in found:
                    found.add(file)
                    todo.append(file)
    # Importing any tc module runs the package's __init__ first.
    return found | {REPO / "tc/__init__.py"} if found else found


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_code_deps_are_the_imports(stage):
    body = STAGES[stage]
    script = script_of(body)
    code = {str(p.relative_to(REPO)) for p in imported_modules(script)} | {str(script.relative_to(REPO))}
    declared = {d for d in entry_paths(body.get("deps")) if d.endswith(".py")}
    assert not code - declared, f"dvc.yaml stage {stage} misses code deps {sorted(code - declared)} (imported)"
    assert not declared - code, f"dvc.yaml stage {stage} lists {sorted(declared - code)}, which it does not import"


def keys(cls, section: str, *, thoughts: bool = True) -> set[str]:
    """``section.key`` of the fields of ``cls`` that change results (not speed-only; TC-only unless ``thoughts``)."""
    return {f"{section}.{f.name}" for f in params_keys(cls)
            if not f.metadata["speed"] and (thoughts or not f.metadata["thoughts"])}  # fmt: skip


# The evaluate.* keys behind EvaluateConfig.kwargs() that change results (batch_size does not).
EVAL_RUN = {"evaluate.seed", "evaluate.argmax", "evaluate.max_steps"}
REPORT = {"demos.level", "demos.episodes", "model.memory_dim", "model.instr_dim", "train.batch_size",
          "train.recurrence", "train.epochs", "train.episodes_per_epoch", "train.warmup_epochs", "train.stop_tf",
          "train.sg_coef", "train.val_episodes", "safety.behaviours"}  # tc/report.py: PAPER_SCALE, level, events
EXPECTED = {
    "generate_demos": keys(DemosConfig, "demos"),
    "train@tc": keys(ModelConfig, "model") | keys(TrainConfig, "train") | {"demos.level", "demos.val_seed"},
    "train@bc": keys(ModelConfig, "model", thoughts=False) | keys(TrainConfig, "train", thoughts=False)
    | {"demos.level", "demos.val_seed"},
    "evaluate": keys(EvaluateConfig, "evaluate") | {"demos.level"},
    "make_ood_levels": keys(OodConfig, "ood") | {"demos.level"},
    "evaluate_ood": EVAL_RUN,
    "safety": keys(SafetyConfig, "safety") | EVAL_RUN | {"demos.level"},
    "plots": keys(PlotsConfig, "plots"),
    "report": REPORT,
}  # fmt: skip


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_params_are_exactly_the_result_settings(stage):
    declared = set(STAGES[stage].get("params") or [])
    assert declared == EXPECTED[stage], (
        f"{stage}: dvc.yaml lists {sorted(declared - EXPECTED[stage])} too many, "
        f"{sorted(EXPECTED[stage] - declared)} missing"
    )


def test_no_speed_setting_invalidates_a_stage():
    speed = {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls) if f.metadata["speed"]}
    assert speed >= {"train.threads", "train.device", "train.nproc", "evaluate.batch_size", "demos.workers"}
    for name, body in STAGES.items():
        assert not speed & set(body.get("params") or []), f"{name} depends on speed-only settings"


SECTIONS = {"demos": DemosConfig, "model": ModelConfig, "train": TrainConfig, "evaluate": EvaluateConfig,
            "ood": OodConfig, "safety": SafetyConfig, "plots": PlotsConfig}  # fmt: skip


def test_outputs_persist():
    """`dvc repro` deletes an output before running its stage unless it is `persist`: resume needs the
    checkpoints and shards, and a failed run must not delete the tracked reports."""
    for name, body in STAGES.items():
        for field in ("outs", "metrics", "plots"):
            for entry in body.get(field) or []:
                path, opts = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
                if path.startswith(("models/", "data/demos/", "reports/")):
                    assert opts.get("persist") is True, f"{name}: {path} is not persist: true"
