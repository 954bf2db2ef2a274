"""Fixtures shared by several test files."""

import importlib.util
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models at small batch: one intra-op thread; a second mostly waits on a shared 2-core CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def goto_demos(tmp_path_factory):
    """Six noise-free BabyAI-GoToLocal bot demos: a real batch for a tiny model's training step."""
    from tc.demos import generate_demos, load_demos

    out = tmp_path_factory.mktemp("demos") / "goto"
    generate_demos("BabyAI-GoToLocal-v0", 0, 6, out, noise_rate=0.0, progress=False)
    return load_demos(out)


@pytest.fixture
def stage_main():
    """``stage_main(name)``: the ``main(argv)`` of stages/<name>.py (the stages are scripts, not a package),
    to run a stage in the test's process."""

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "stages" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"stage_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.main

    return load


@pytest.fixture
def free_port() -> int:
    """A local TCP port nothing listens on right now (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def serve(tmp_path):
    """Start local servers for a test: ``serve(name, cmd, ready_url, timeout)`` waits until
    ``ready_url`` answers and returns; every server (and its workers) is stopped afterwards."""
    started = []

    def start(name: str, cmd: list[str], ready_url: str, timeout: float = 60, cwd=None) -> None:
        log_path = tmp_path / f"{name}.log"
        log = open(log_path, "w")
        # Its own session, so that stopping it stops its workers and nothing else.
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        started.append((proc, log))
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(ready_url, timeout=2):
                    return
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"{name} did not start: {log_path.read_text()[-2000:]}")
                time.sleep(0.3)

    yield start
    for proc, log in started:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
