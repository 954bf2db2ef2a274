import signal
import time

import numpy as np
import pytest

from tc import vocab
from tc.envs import LevelGenerationError, babyai_ids, make_env, reset_quiet


def test_unknown_level_names_close_matches():
    with pytest.raises(ValueError, match="BabyAI-BossLevel-v0"):
        make_env("BabyAI-BosLevel-v0")


def test_all_levels_registered():
    assert "BabyAI-BossLevel-v0" in babyai_ids()
    assert len(babyai_ids()) >= 90


def test_reset_is_seeded_and_quiet(capfd):
    env = make_env("BabyAI-BossLevel-v0")
    a = reset_quiet(env, 7)
    b = reset_quiet(env, 7)
    c = reset_quiet(env, 8)
    assert a["mission"] == b["mission"] and np.array_equal(a["image"], b["image"])
    assert a["mission"] != c["mission"] or not np.array_equal(a["image"], c["image"])
    assert "Sampling rejected" not in capfd.readouterr().out


def test_a_level_that_is_never_generated_is_an_error_naming_the_seed():
    # minigrid's RoomGrid.place_agent loops forever on this seed: without the deadline, a hang
    env = make_env("BabyAI-SynthS5R2-v0")
    start = time.monotonic()
    with pytest.raises(LevelGenerationError, match="BabyAI-SynthS5R2-v0: seed 200000192 was not generated within 1 s"):
        reset_quiet(env, 200000192, timeout_s=1)
    assert time.monotonic() - start < 5
    assert reset_quiet(env, 200000193)["image"].shape == (7, 7, 3)  # the next reset runs, the alarm is off
    assert signal.getsignal(signal.SIGALRM) is signal.SIG_DFL


def test_every_level_mission_is_in_vocabulary():
    for env_id in babyai_ids():
        mission = reset_quiet(make_env(env_id), 0)["mission"]
        assert vocab.decode(vocab.encode(mission)) == " ".join(vocab.tokenize(mission))


def test_encode_padded_and_errors():
    out = vocab.encode_padded(["go to the red ball", "open a door"], eos=True)
    assert out.dtype == np.uint8 and out.shape == (2, 6)
    assert out[1, 3] == vocab.EOS and out[1, 4] == vocab.PAD
    with pytest.raises(ValueError, match="banana"):
        vocab.encode("pick up the banana")
    with pytest.raises(ValueError, match="limit 2"):
        vocab.encode_padded(["go to the red ball"], length=2)
