"""Demo generation, storage format, loading, checks and the DVC stage script."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tc import vocab
from tc.demos import (
    DatasetError,
    format_episode,
    generate_demos,
    load_demos,
    replay_episode,
    run_episode,
    write_manifest,
)

LEVEL = "BabyAI-BossLevel-v0"


@pytest.fixture(scope="module")
def boss(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("boss")
    generate_demos(LEVEL, 0, 12, out, noise_rate=0.0, workers=1, shard_size=5, progress=False)
    return out


def test_dataset_layout_and_arrays(boss):
    d = load_demos(boss)
    m = d.manifest
    assert sorted(p.name for p in boss.glob("shard-*.npz")) == m["shards"] == [
        "shard-00000.npz", "shard-00001.npz", "shard-00002.npz"]
    assert d.num_episodes == m["num_episodes"] == 12 - m["num_failed"]
    assert d.num_steps == m["num_steps"] == d.offsets[-1]
    assert d.images.shape == (d.num_steps, 7, 7, 3) and d.images.dtype == np.uint8
    assert d.thoughts.shape == (d.num_steps, vocab.MAX_THOUGHT_LEN)
    assert (d.thoughts == vocab.EOS).sum(axis=1).min() == 1  # every thought is terminated
    assert list(d.seeds) == [s for s in range(12) if str(s) not in m["failed_seeds"]]
    assert m["level"] == LEVEL and m["vocab"] == vocab.WORDS and m["noise_rate"] == 0.0
    assert not d.noise.any()
    assert vocab.decode(d.missions[1]) == "pick up a purple ball and open a red door"


def test_replay_reproduces_observations_and_success(boss):
    d = load_demos(boss)
    assert all(replay_episode(d, e) == (True, True) for e in range(d.num_episodes))
    d.actions[d.offsets[0]] = (d.actions[d.offsets[0]] + 1) % 3  # tamper with one action
    assert replay_episode(d, 0) != (True, True)


def test_format_episode(boss):
    text = format_episode(load_demos(boss), 1).splitlines()
    assert text[0] == "episode 1 seed 1: pick up a purple ball and open a red door"
    assert text[1].startswith("t=0-") and "pickup purple ball to complete pickup mission  actions [" in text[1]
    assert text[-1].endswith("toggle]")


def test_same_data_whatever_the_number_of_workers(tmp_path):
    # Shards of 24 episodes span several pool chunks, so results taken in the order workers
    # finish them (not in seed order) would show here.
    for workers in (1, 2):
        generate_demos(LEVEL, 40, 48, tmp_path / f"w{workers}", noise_rate=0.2, workers=workers,
                       shard_size=24, bot="fast", progress=False)
    for name in ("shard-00000.npz", "shard-00001.npz", "manifest.json"):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name
    assert list(load_demos(tmp_path / "w2").seeds) == list(range(40, 88))


def test_fast_bot_makes_the_same_shards(tmp_path):
    for bot in ("minigrid", "fast"):
        generate_demos(LEVEL, 60, 4, tmp_path / bot, noise_rate=0.1, shard_size=2, bot=bot, progress=False)
    for f in (tmp_path / "minigrid").iterdir():
        assert (tmp_path / "fast" / f.name).read_bytes() == f.read_bytes(), f.name


def test_sharded_generation_merges_to_the_single_run(tmp_path):
    generate_demos(LEVEL, 50, 6, tmp_path / "one", noise_rate=0.1, shard_size=2, progress=False)
    for i in range(3):  # three "machines", each with its own shards, copied together
        assert generate_demos(LEVEL, 50, 6, tmp_path / f"m{i}", noise_rate=0.1, shard_size=2, shards=(i, 3),
                              progress=False) is None
        for f in (tmp_path / f"m{i}").glob("shard-*.npz"):
            (tmp_path / "merged").mkdir(exist_ok=True)
            shutil.copy(f, tmp_path / "merged" / f.name)
    shutil.copy(tmp_path / "m0" / "config.json", tmp_path / "merged" / "config.json")
    write_manifest(tmp_path / "merged")
    for f in (tmp_path / "one").iterdir():
        assert (tmp_path / "merged" / f.name).read_bytes() == f.read_bytes(), f.name


def test_noise_statistics_match_the_rate():
    rate, starts, draws, lengths = 0.1, 0, 0, []
    for seed in range(30):
        ep = run_episode(LEVEL, seed, rate, bot="fast")
        starts += int((ep.noise == 1).sum())
        draws += int((ep.noise <= 1).sum())  # a segment may start at every step outside one
        for t in np.flatnonzero(ep.noise == 1):
            n = 1
            while t + n < len(ep.noise) and ep.noise[t + n] == 2:
                n += 1
            lengths.append(n)
            assert set(ep.actions[t:t + n]) <= {0, 1, 2}          # left, right, forward only
            assert len(set(ep.thoughts[t:t + n])) == 1            # one thought per segment
    assert starts > 200
    assert abs(starts / draws - rate) < 0.2 * rate
    # Segment lengths are uniform over 1..5: each at about a fifth of the segments.
    counts = np.bincount(lengths, minlength=6)
    assert len(counts) == 6 and counts[0] == 0, counts  # lengths 1..5 only
    assert all(0.13 < c / len(lengths) < 0.27 for c in counts[1:]), counts


def test_noisy_episodes_still_succeed_and_replay(tmp_path):
    generate_demos(LEVEL, 0, 8, tmp_path, noise_rate=0.1, progress=False)
    d = load_demos(tmp_path)
    assert d.noise.any()
    assert all(replay_episode(d, e) == (True, True) for e in range(d.num_episodes))


def test_corrupt_or_truncated_shard_is_named(boss, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(boss, copy)
    shard = copy / "shard-00001.npz"
    shard.write_bytes(shard.read_bytes()[:2000])
    with pytest.raises(DatasetError, match="shard-00001.npz"):
        load_demos(copy)
    shard.write_bytes(b"not a zip file")
    with pytest.raises(DatasetError, match="shard-00001.npz"):
        load_demos(copy)


def test_incomplete_dataset_and_version_mismatch(boss, tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_demos(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(boss, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["vocab_version"] = 0
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="regenerate"):
        load_demos(copy)


def test_resume_keeps_finished_shards_and_refuses_other_settings(boss, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(boss, copy)
    (copy / "manifest.json").unlink()
    (copy / "shard-00002.npz").unlink()
    (copy / "shard-00001.npz").write_bytes(b"half-written")
    kept = (copy / "shard-00000.npz").stat().st_mtime_ns
    generate_demos(LEVEL, 0, 12, copy, noise_rate=0.0, shard_size=5, progress=False)
    assert (copy / "shard-00000.npz").stat().st_mtime_ns == kept
    for f in boss.iterdir():
        assert (copy / f.name).read_bytes() == f.read_bytes(), f.name
    with pytest.raises(DatasetError, match="fresh directory"):
        generate_demos(LEVEL, 0, 12, copy, noise_rate=0.5, shard_size=5, progress=False)


def test_interrupted_generation_resumes_to_the_same_bytes(boss, tmp_path):
    out = tmp_path / "demos"
    code = (f"from tc.demos import generate_demos; generate_demos({LEVEL!r}, 0, 12, {str(out)!r}, noise_rate=0.0, "
            "shard_size=5, bot='minigrid', progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        while not (out / "shard-00000.npz").exists() and proc.poll() is None:
            time.sleep(0.01)
    finally:
        proc.kill()  # as a crash or a killed job would: no clean-up
        proc.wait()
    assert (out / "shard-00000.npz").exists() and not (out / "manifest.json").exists()
    # What a kill in the middle of writing a shard leaves behind: never taken as a shard.
    (out / ".shard-00001.k1ll3d.tmp.npz").write_bytes((boss / "shard-00001.npz").read_bytes()[:3000])
    generate_demos(LEVEL, 0, 12, out, noise_rate=0.0, shard_size=5, bot="fast", progress=False)
    assert sorted(f.name for f in out.iterdir()) == sorted(f.name for f in boss.iterdir())
    for f in boss.iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name


def test_bad_arguments():
    with pytest.raises(ValueError, match="BabyAI-BossLevel-v0"):
        generate_demos("BabyAI-Bosslevel-v0", 0, 1, "unused")
    with pytest.raises(ValueError, match="noise_rate"):
        generate_demos(LEVEL, 0, 1, "unused", noise_rate=1.5)
    with pytest.raises(ValueError, match="minigrid, fast"):
        generate_demos(LEVEL, 0, 1, "unused", bot="fastest")


def test_stage_script(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(
        "demos:\n  level: BabyAI-GoToLocal-v0\n  episodes: 4\n  val_episodes: 2\n  noise_rate: 0.0\n"
        "  seed: 0\n  val_seed: 1000\n  shard_size: 3\n  workers: 1\n  bot: fast\n")
    cmd = [sys.executable, "stages/generate_demos.py", "--params", str(params),
           "--train-out", str(tmp_path / "train"), "--val-out", str(tmp_path / "val")]
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=True).stdout
    assert "4 episodes" in out and "2 episodes" in out
    assert list(load_demos(tmp_path / "val").seeds) == [1000, 1001]
    params.write_text("demos:\n  level: BabyAI-GoToLocal-v0\n  episodes: four\n")
    bad = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    assert bad.returncode != 0 and "demos.episodes" in bad.stderr
