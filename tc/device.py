"""Choosing the torch device of a stage (train.device, evaluate.device: auto | cpu | cuda)."""

from __future__ import annotations

import torch

from tc.params import ConfigError


def pick_device(name: str, threads: int = 0, key: str = "device") -> torch.device:
    """``auto``: CUDA when torch sees a GPU, else the CPU; ``cuda`` without a GPU is an error naming ``key``.

    On the CPU, torch uses ``threads`` intra-op threads (0: torch's default). The stages'
    default is one: their step-wise ops are small, and on a shared CPU OpenMP's waiting for
    a busy core made training updates ~30x and evaluation ~5x slower (measured).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    elif name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key} is 'cuda' but torch sees no CUDA device; use auto or cpu")
    device = torch.device(name)
    if device.type == "cpu" and threads > 0:
        torch.set_num_threads(threads)
    return device
