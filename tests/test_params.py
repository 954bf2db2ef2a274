"""Typed params: one source of defaults, and every stage refusing bad settings in one line before any work."""

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from tc.demos import DemosConfig
from tc.evaluate import EvaluateConfig
from tc.model import ModelConfig
from tc.ood import OodConfig
from tc.params import ConfigError, dataclass_from_dict, load_configs, load_params, params_keys
from tc.plots import PlotsConfig
from tc.safety import SafetyConfig
from tc.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]
SECTIONS = {"demos": DemosConfig, "model": ModelConfig, "train": TrainConfig, "evaluate": EvaluateConfig,
            "ood": OodConfig, "safety": SafetyConfig, "plots": PlotsConfig}  # fmt: skip


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_params_yaml_and_dataclass_defaults_agree(section):
    """params.yaml gives every key, and each dataclass default is params.yaml's value (one source of defaults)."""
    given = yaml.safe_load((REPO / "params.yaml").read_text())[section]
    cls = SECTIONS[section]
    fields = {f.name: f for f in params_keys(cls)}
    assert sorted(given) == sorted(fields), f"params.yaml {section} keys differ from {cls.__name__}'s"
    defaults = dataclasses.asdict(cls())
    drift = {k: (given[k], defaults[k]) for k in fields if given[k] != defaults[k]}
    assert not drift, f"{section}: params.yaml vs {cls.__name__} default: {drift}"


@pytest.mark.parametrize("name", ["params-paper.yaml", "params-gpu.yaml"])
def test_paper_params_are_valid(name):
    load_configs(REPO / name, **SECTIONS)


@pytest.mark.parametrize(
    "section, value, message",
    [
        ("train", {"epochs": "three"}, "train.epochs = 'three': expected an int >= 1"),
        ("train", {"amp": "no"}, "train.amp = 'no': expected true or false"),
        ("train", {"lr": "fast"}, "train.lr = 'fast': expected a number > 0"),
        ("train", {"lr": -1}, "train.lr = -1: expected a number > 0"),
        ("train", {"lr": float("nan")}, "train.lr = nan: expected a number > 0"),
        ("train", {"lr_halve_epoch": "never"}, "train.lr_halve_epoch = 'never': expected an int or null >= 0"),
        ("train", {"device": "gpu"}, "train.device = 'gpu': expected one of auto, cpu, cuda"),
        ("train", {"compile": "fast"}, "train.compile = 'fast': expected null or one of default, max-autotune-no-cudagraphs"),
        ("train", {"epocs": 3}, "unknown train config keys ['epocs']"),
        ("model", {"instr_dim": 129}, "model.instr_dim (129) must be even (two GRU directions) and divisible by"),
        ("ood", {"behavioural_bins": [25, 80, 125]}, "ood.behavioural_bins: expected evenly spaced"),
        ("ood", {"cognitive_levels": [1, "2"]}, "ood.cognitive_levels = [1, '2']: expected a list of an int >= 1"),
        ("demos", {"bot": "fastest"}, "demos.bot = 'fastest': expected one of minigrid, fast"),
        ("safety", {"behaviours": [{"name": "x", "thought": "(", "event": "pickup:red"}]}, "not a valid regex"),
    ],
)
def test_bad_values_are_named_in_one_line(section, value, message):
    with pytest.raises(ConfigError) as err:
        dataclass_from_dict(SECTIONS[section], value, section)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_numbers_are_normalised():
    cfg = TrainConfig.from_dict({"lr": 1, "lr_halve_epoch": None})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.lr_halve_epoch is None


def test_params_read_as_dvc_reads_them_and_keys_not_repeated(tmp_path):
    path = tmp_path / "params.yaml"
    # A hand-written `5e-4` is a number to DVC (YAML 1.2, e.g. `dvc params diff`), a string to PyYAML alone.
    path.write_text("train:\n  lr: 5e-4\n  max_grad_norm: 1E+1\n  sg_coef: 1.5e1\n  adam_eps: .5e-4\n  device: 5e-4x\n")
    assert load_params(path)["train"] == {"lr": 0.0005, "max_grad_norm": 10.0, "sg_coef": 15.0, "adam_eps": 5e-05,
                                          "device": "5e-4x"}
    assert yaml.safe_load(path.read_text())["train"]["lr"] == "5e-4"
    # A repeated section would replace the first one whole, its other keys falling back to defaults.
    path.write_text("train:\n  epochs: 1\n  lr: 0.001\nplots:\n  dpi: 100\ntrain:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"params\.yaml is not valid YAML: duplicate key 'train' \(lines 1 and 6\)$"):
        load_params(path)
    path.write_text("train:\n  epochs: 1\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'epochs' \(lines 2 and 3\)$"):
        load_params(path)
    path.write_text("base: &base {lr: 0.001, epochs: 1}\ntrain:\n  <<: *base\n  epochs: 2\n")  # merges may override
    assert load_params(path)["train"] == {"lr": 0.001, "epochs": 2}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_names_the_key():
    with pytest.raises(ConfigError, match=r"^evaluate\.device is 'cuda' but torch sees no CUDA device; use auto or cpu"):
        EvaluateConfig(device="cuda").device_for_torch()


TRAIN_ARGS = ["--agent", "tc", "--out", "models/tc", "--metrics", "m.json", "--history", "h.csv"]


# The cases, each through the stage that reads the key (stage, its extra args, key, value, message).
STAGE_CASES = [
    ("train", TRAIN_ARGS, "train.epochs", "three", "train.epochs = 'three': expected an int >= 1"),
    ("train", TRAIN_ARGS, "train.amp", "no", "train.amp = 'no': expected true or false"),
    ("train", TRAIN_ARGS, "train.lr", "fast", "train.lr = 'fast'"),
    ("train", TRAIN_ARGS, "train.lr", -1, "train.lr = -1: expected a number > 0"),
    ("train", TRAIN_ARGS, "train.lr_halve_epoch", "never", "train.lr_halve_epoch = 'never'"),
    ("train", TRAIN_ARGS, "train.val_episodes", -2, "train.val_episodes = -2: expected an int >= 0"),
    ("train", TRAIN_ARGS, "train.sg_coef", -5, "train.sg_coef = -5: expected a number >= 0"),
    ("train", TRAIN_ARGS, "evaluate.batch_size", 0, "evaluate.batch_size = 0"),  # every section it reads
    # 500 episodes an epoch in batches of 32: the last batch holds 20
    ("train", TRAIN_ARGS, "train.nproc", 24, "train.nproc = 24: more processes than the 20 episodes of an epoch's "
                                             "smallest batch (train.episodes_per_epoch 500, train.batch_size 32)"),
    ("plots", [], "plots.dpi", 0, "plots.dpi = 0: expected an int >= 10 and <= 1200"),
    ("evaluate", [], "evaluate.episodes", 0, "evaluate.episodes = 0: expected an int >= 1"),
    ("evaluate", [], "evaluate.episodes", -3, "evaluate.episodes = -3"),
    ("evaluate", [], "evaluate.max_steps", -1, "evaluate.max_steps = -1: expected an int or null >= 1"),
    ("evaluate_ood", [], "evaluate.argmax", 1, "evaluate.argmax = 1: expected true or false"),
    ("safety", [], "demos.level", "BabyAI-BossLvl-v0", "demos.level: unknown BabyAI level 'BabyAI-BossLvl-v0'"),
    ("safety", [], "safety.episodes", 0, "safety.episodes = 0"),
    ("make_ood_levels", [], "ood.max_candidates", 0, "ood.max_candidates = 0"),
    ("generate_demos", [], "demos.noise_rate", 1.5, "demos.noise_rate = 1.5: expected a number >= 0 and < 1"),
    ("generate_demos", [], "demos.level", "Boss", "demos.level: unknown BabyAI level 'Boss'"),
    ("generate_demos", [], "demos.val_seed", 400,
     "demos.val_seed: validation seeds 400..449 overlap the training seeds 0..499 (demos.seed); move one of them"),
    # past the 30 validation demos, but within training's 50 validation rollouts (train.val_episodes)
    ("evaluate", [], "evaluate.seed", 100_000_030, "evaluate.seed: test seeds 100000030..100000229 overlap the "
                                                   "validation seeds 100000000..100000049 (demos.val_seed)"),
    ("make_ood_levels", [], "ood.seed", 0, "ood.seed: test seeds 0..2999 overlap the training seeds 0..499"),
    ("safety", [], "safety.seed", 499, "safety.seed: test seeds 499..548 overlap the training seeds 0..499"),
]  # fmt: skip


@pytest.mark.parametrize("stage, args, key, value, message", STAGE_CASES)
def test_stages_refuse_bad_params_before_any_work(tmp_path, monkeypatch, capsys, stage_main, stage, args, key, value,
                                                  message):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    section, name = key.split(".")
    params[section][name] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)  # outputs, if any were written, would land here
    with pytest.raises(SystemExit) as exit_:
        stage_main(stage)(["--params", "params.yaml", *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.count("\n") == 1 and err.startswith("error: params.yaml: "), err
    assert message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # no output, no mlflow.db
