"""DVC remotes: data pushed to a local-folder remote, or to S3 (moto's server), pulls back byte-identical."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent  # the venv's bin: dvc, moto_server
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path):
    """A fresh git + DVC repository holding one DVC-tracked binary file; returns (root, sh, payload)."""
    root = tmp_path / "project"
    root.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "AWS_"))}
    env |= {"PATH": f"{BIN}{os.pathsep}{env['PATH']}", "DVC_NO_ANALYTICS": "1"}
    env |= {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}

    def sh(*cmd: str, extra_env: dict | None = None) -> str:
        out = subprocess.run(cmd, cwd=root, env=env | (extra_env or {}), capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}"
        return out.stdout

    sh("git", "init", "-q")
    sh("dvc", "init", "-q")
    payload = bytes(range(256)) * 64 + os.urandom(1000)  # binary, not text: byte-identity matters
    (root / "data").mkdir()
    (root / "data" / "shard.npz").write_bytes(payload)
    sh("dvc", "add", "data/shard.npz")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "data")
    return root, sh, payload


def push_wipe_pull(root: Path, sh, payload: bytes, remote: str, extra_env: dict | None = None) -> None:
    """Push to ``remote``, delete the file and the whole cache, pull, and check the bytes."""
    sh("dvc", "push", "-r", remote, extra_env=extra_env)
    (root / "data" / "shard.npz").unlink()
    shutil.rmtree(root / ".dvc" / "cache")
    sh("dvc", "pull", "-r", remote, extra_env=extra_env)
    assert (root / "data" / "shard.npz").read_bytes() == payload
    assert "in sync" in sh("dvc", "status", "-c", "-r", remote, extra_env=extra_env)


def test_local_folder_remote_round_trip(project, tmp_path):
    root, sh, payload = project
    # The README's command, relative to the repository (DVC stores it relative to .dvc/config).
    sh("dvc", "remote", "add", "-d", "local", "../tc-dvc-store")
    store = tmp_path / "tc-dvc-store"
    push_wipe_pull(root, sh, payload, "local")
    assert store.is_dir() and any(p.is_file() for p in store.rglob("*"))


def test_repository_default_remote_is_a_local_folder():
    """The project itself ships a local-folder default remote (README, "Remote storage")."""
    out = subprocess.run([str(BIN / "dvc"), "remote", "list"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[:3] == ["local", str(REPO.parent / "tc-dvc-store"), "(default)"]


@pytest.fixture
def moto_s3(serve, free_port):
    """moto's S3 server on a free local port with one bucket; returns (its URL, a boto3 client)."""
    pytest.importorskip("dvc_s3", reason="dvc-s3 is not installed (dev extra): the S3 remote cannot be tested")
    pytest.importorskip("moto.server", reason="moto[server] is not installed (dev extra): no local S3 to test against")
    boto3 = pytest.importorskip("boto3")
    url = f"http://127.0.0.1:{free_port}"
    serve("moto", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(free_port)], url + "/moto-api/")
    s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip
    s3.create_bucket(Bucket="tc-dvc-store")
    return url, s3


def test_s3_remote_round_trip(project, moto_s3):
    root, sh, payload = project
    url, s3 = moto_s3
    sh("dvc", "remote", "add", "s3", "s3://tc-dvc-store/cache")
    sh("dvc", "remote", "modify", "s3", "endpointurl", url)
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    push_wipe_pull(root, sh, payload, "s3", extra_env=creds)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="tc-dvc-store").get("Contents", [])]
    assert keys and all(k.startswith("cache/files/md5/") for k in keys)
