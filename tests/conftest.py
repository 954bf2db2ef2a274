"""Fixtures shared by several test files."""

import socket

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models at small batch: one intra-op thread; a second mostly waits on a shared 2-core CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def free_port() -> int:
    """A local TCP port nothing listens on right now (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
