import json
import os

import pytest

from tc.io import atomic_path, write_json_atomic


def test_atomic_write_replaces_whole_file_and_is_readable(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    write_json_atomic(target, {"b": 1, "a": [1, 2]})
    assert json.loads(target.read_text()) == {"a": [1, 2], "b": 1}
    assert target.stat().st_mode & 0o044  # readable by others, unlike a bare mkstemp file
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "summary.md"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.suffix == ".md" and tmp.parent == tmp_path
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["summary.md"]
