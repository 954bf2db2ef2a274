"""Choosing the torch device of a stage (train.device, evaluate.device: auto | cpu | cuda)."""

from __future__ import annotations

import torch

from tc.params import ConfigError


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA when torch sees a GPU, else the CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device is 'cuda' but torch sees no CUDA device; use auto or cpu")
    return torch.device(name)
