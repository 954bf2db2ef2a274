"""Agent checkpoints: plain tensors and dicts, read back with ``torch.load(weights_only=True)``."""

from __future__ import annotations

from pathlib import Path

import torch

from tc import vocab
from tc.io import atomic_path
from tc.model import Agent, ModelConfig
from tc.params import UserError



class CheckpointError(UserError, ValueError):
    """A checkpoint file that cannot be used: unreadable, of another format, vocabulary or architecture."""


CHECKPOINT_FORMAT = "thought-cloning-agent"
CHECKPOINT_VERSION = 2  # 2: the paper's agent (shared perception); 1 was the earlier redesign


def save_checkpoint(path, agent: Agent, train_state: dict | None = None, meta: dict | None = None) -> None:
    """Write ``agent`` (config, weights, vocab version) and optional resume state, atomically.

    Everything is plain dicts/lists/str/int/float/tensors so ``torch.load(weights_only=True)``
    reads it back without unpickling code.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "vocab_version": vocab.VOCAB_VERSION,
        "model_config": agent.cfg.to_dict(),
        "model": {k: v.detach().cpu() for k, v in agent.state_dict().items()},
        "train_state": train_state,
        "meta": meta or {},
    }
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read and check a checkpoint written by :func:`save_checkpoint`; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated file, a pickle of code, a text file...
        # Not torch's message: it suggests weights_only=False, i.e. running whatever code the file holds.
        raise CheckpointError(f"{path} is not a readable agent checkpoint (truncated, corrupt or not written by "
                              f"this code: {type(e).__name__})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an agent checkpoint (expected a dict with format={CHECKPOINT_FORMAT!r})")
    if ckpt.get("format_version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {ckpt.get('format_version')}, this code reads "
                              f"{CHECKPOINT_VERSION} (another agent architecture): delete it and train again")
    if ckpt.get("vocab_version") != vocab.VOCAB_VERSION:
        raise CheckpointError(f"{path} was trained with vocabulary version {ckpt.get('vocab_version')}, "
                              f"this code has {vocab.VOCAB_VERSION}")
    return ckpt


def check_config(path, ckpt: dict, expected: ModelConfig) -> None:
    """Raise CheckpointError naming ``path`` and every field where the checkpoint's config differs."""
    saved = ckpt["model_config"]
    diff = {k: (saved.get(k), v) for k, v in expected.to_dict().items() if saved.get(k) != v}
    diff.update({k: (saved[k], None) for k in saved.keys() - expected.to_dict().keys()})
    if diff:
        text = ", ".join(f"{k}: checkpoint {a!r} vs expected {b!r}" for k, (a, b) in sorted(diff.items()))
        raise CheckpointError(f"{path} holds a different model architecture ({text})")


def load_agent(path, map_location="cpu", expected: ModelConfig | None = None) -> Agent:
    """Rebuild the :class:`Agent` saved in ``path``; with ``expected``, its config must match."""
    ckpt = load_checkpoint(path, map_location)
    if expected is not None:
        check_config(path, ckpt, expected)
    try:
        cfg = ModelConfig.from_dict(ckpt["model_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path} has an invalid model config: {e}") from None
    agent = Agent(cfg)
    expected, weights = agent.state_dict(), ckpt["model"]
    missing, unexpected = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    shapes = sorted(k for k in expected.keys() & weights.keys() if expected[k].shape != weights[k].shape)
    if missing or unexpected or shapes:
        few = lambda keys: f"{keys[:5]}{'...' if len(keys) > 5 else ''}"  # noqa: E731
        kind = "TC" if cfg.use_thoughts else "BC"
        raise CheckpointError(f"{path} does not fit the {kind} architecture of this code: "
                              f"missing {few(missing)}, unexpected {few(unexpected)}, other shapes {few(shapes)}")
    agent.load_state_dict(weights)
    return agent.to(map_location)
