"""The fixed word vocabulary shared by missions and thoughts.

Fixed (not built from data) so that every dataset, checkpoint and level set agrees on
token ids. Bump ``VOCAB_VERSION`` whenever the list changes: datasets and checkpoints
record it and refuse to mix versions.
"""

from __future__ import annotations

import numpy as np

VOCAB_VERSION = 1

PAD, BOS, EOS = 0, 1, 2
SPECIALS = ["<pad>", "<bos>", "<eos>"]

COLORS = ["red", "green", "blue", "purple", "yellow", "grey"]
OBJECT_TYPES = ["door", "key", "ball", "box", "object"]

# Words of BabyAI missions (minigrid/envs/babyai/core/verifier.py surface forms).
MISSION_WORDS = [
    "go", "to", "pick", "up", "open", "put", "next", "the", "a", "then", "after", "you",
    "and", "in", "front", "of", "behind", "on", "your", "left", "right",
    "get", "use", "key", "fetch",
]
# Extra words of the synthetic thoughts (tc/thoughts.py templates).
THOUGHT_WORDS = [
    "pickup", "drop", "unlock", "close", "explore", "unseen", "area", "complete",
    "mission", "goto", "putnext", "temporary", "find", "remove", "blocking", "object",
    "door", "back", "free", "hands", "through",
]

WORDS: list[str] = list(dict.fromkeys(SPECIALS + COLORS + OBJECT_TYPES + MISSION_WORDS + THOUGHT_WORDS))
WORD_TO_ID: dict[str, int] = {w: i for i, w in enumerate(WORDS)}
VOCAB_SIZE = len(WORDS)

MAX_THOUGHT_LEN = 16  # words + <eos>; the paper caps thoughts at 15 tokens


def tokenize(text: str) -> list[str]:
    """Lower-case words of a mission or thought; punctuation (", then") is dropped."""
    return text.lower().replace(",", " ").split()


def encode(text: str) -> list[int]:
    """Token ids of ``text``; raises ValueError on a word outside the vocabulary."""
    ids = []
    for word in tokenize(text):
        if word not in WORD_TO_ID:
            raise ValueError(f"word {word!r} of {text!r} is not in the vocabulary (version {VOCAB_VERSION})")
        ids.append(WORD_TO_ID[word])
    return ids


def decode(ids) -> str:
    """Words of ``ids`` up to the first <eos>, skipping <pad> and <bos>."""
    words = []
    for i in ids:
        i = int(i)
        if i == EOS:
            break
        if i not in (PAD, BOS):
            words.append(WORDS[i])
    return " ".join(words)


def encode_padded(texts: list[str], length: int | None = None, eos: bool = False) -> np.ndarray:
    """Encode ``texts`` into a uint8 matrix [len(texts), length] padded with <pad>.

    With ``eos`` each row ends with <eos> (thoughts, which the decoder must learn to stop).
    ``length`` defaults to the longest row; a longer row raises ValueError.
    """
    rows = [encode(t) + ([EOS] if eos else []) for t in texts]
    width = max((len(r) for r in rows), default=0) if length is None else length
    out = np.full((len(rows), width), PAD, dtype=np.uint8)
    for i, r in enumerate(rows):
        if len(r) > width:
            raise ValueError(f"{texts[i]!r} has {len(r)} tokens, more than the limit {width}")
        out[i, : len(r)] = r
    return out
