"""Persisted outputs under DVC: the stages resume what the same settings and code made, and start
afresh (with --restart-if-changed, as dvc.yaml runs them) over what other settings or code made."""

from pathlib import Path

import pytest
import yaml

from tc.demos import load_demos
from tc.provenance import DIGEST_FILE

REPO = Path(__file__).resolve().parents[1]
LEVEL = "BabyAI-GoToObj-v0"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["demos"].update(level=LEVEL, episodes=3, val_episodes=2, shard_size=2, workers=1, noise_rate=0.0)
    params["model"] = {"image_dim": 16, "memory_dim": 32, "instr_dim": 16, "attn_heads": 2}
    params["train"].update(epochs=1, episodes_per_epoch=3, batch_size=3, val_episodes=0, device="cpu")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def set_param(root: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def test_generation_restarts_over_other_settings_or_code(workdir, capsys, stage_main):
    generate = stage_main("generate_demos")
    generate(["--restart-if-changed"])
    generate(["--restart-if-changed"])  # same settings and code: every shard is kept
    assert "afresh" not in capsys.readouterr().out

    set_param(workdir, "demos", "seed", 7)
    with pytest.raises(SystemExit):  # by hand: refused, the folder is left alone
        generate([])
    assert "holds demos made with" in capsys.readouterr().err
    generate(["--restart-if-changed"])
    assert "starting data/demos/train afresh" in capsys.readouterr().out
    assert list(load_demos(workdir / "data/demos/train").seeds) == [7, 8, 9]

    # Other code's shards: by hand, continued with a warning, keeping that code's digest, so
    # that the next DVC run (--restart-if-changed) still starts them afresh.
    digest = workdir / "data/demos/train" / DIGEST_FILE
    digest.write_text("digest of other code\n")
    generate([])
    assert "warning: data/demos/train holds demos made by other code" in capsys.readouterr().err
    assert digest.read_text() == "digest of other code\n"
    generate(["--restart-if-changed"])
    assert "starting data/demos/train afresh: its demos were made by other code" in capsys.readouterr().out
    assert list(load_demos(workdir / "data/demos/train").seeds) == [7, 8, 9]
    assert digest.read_text() != "digest of other code\n"


def test_training_resumes_or_restarts(workdir, capsys, stage_main):
    stage_main("generate_demos")([])
    train = stage_main("train")
    args = ["--agent", "bc", "--out", "models/bc", "--metrics", "m.json", "--history", "h.csv"]
    train(args)
    capsys.readouterr()
    (workdir / "m.json").unlink()
    train([*args, "--restart-if-changed"])  # same settings and code, e.g. after a deleted report: no retraining
    assert "resuming from models/bc/last.pt: its run is finished, nothing left to train" in capsys.readouterr().out
    assert (workdir / "m.json").is_file()

    set_param(workdir, "train", "lr", 0.001)
    with pytest.raises(SystemExit) as exit_info:
        train(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1
    assert "cannot resume from models/bc/last.pt" in err and "lr: checkpoint 0.0005 vs now 0.001" in err
    assert "or pass --no-resume" in err
    train([*args, "--restart-if-changed"])
    assert "starting afresh: cannot resume" in capsys.readouterr().out

    digest = workdir / "models/bc" / DIGEST_FILE
    digest.write_text("digest of other code\n")
    train(args)  # by hand: resumed with a warning, and the digest still says other code
    out, err = capsys.readouterr()
    assert "warning: models/bc/last.pt was written by other code" in err and "resuming from models/bc/last.pt" in out
    assert digest.read_text() == "digest of other code\n"
    train([*args, "--restart-if-changed"])
    assert "starting afresh: models/bc/last.pt was written by other code" in capsys.readouterr().out
    assert digest.read_text() != "digest of other code\n"

    (workdir / "models/bc/last.pt").write_bytes((workdir / "models/bc/best.pt").read_bytes())
    with pytest.raises(SystemExit):  # weights without the optimizer, RNG and position
        train(args)
    assert capsys.readouterr().err == ("error: models/bc/last.pt holds no training state to resume (a best.pt copied "
                                       "there?); delete it or pass --no-resume to start afresh\n")
