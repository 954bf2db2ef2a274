"""The Thought Cloning agent (two levels) and the BC baseline (lower level alone).

Upper level, the thought generator: the mission is encoded by a bidirectional GRU; the
thoughts emitted so far are summarised by an LSTM cell (pushed each time the thought
changes); a transformer-style cross attention lets that history query the mission words;
the result FiLM-modulates the image features; an LSTM cell is the memory; a GRU cell
decoder writes the next thought word by word (teacher-forced in training, greedy when
acting).

Lower level, the action generator (BabyAI 1.1 agent): bag-of-words image embedding and
two convolutions, two FiLM blocks with residuals conditioned on a memory-keyed attention
over the word encodings of (thought + mission), an LSTM cell memory and an actor head.
The BC baseline (``use_thoughts=False``) is the lower level conditioned on the mission only.

Everything that does not depend on the recurrent memory (image stems, word encodings,
the upper level's attention and FiLM, the decoder) runs once over all frames of a chunk;
only the memory cells (and the lower FiLM stack, whose attention is keyed by the memory)
step through time. Frames are laid out *time-major with a shrinking active set*: the
episodes of a batch are sorted by length, longest first, so step t covers the first
``sizes[t]`` episodes and its rows are one contiguous slice. Acting is the same code with
one step of ``sizes=[B]``.

Step-wise recurrence uses ``nn.LSTMCell``/``nn.GRUCell``: at small batch they are ~6x
faster on CPU than the fused oneDNN kernels (SPEC, "Speed reference").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX, STATE_TO_IDX
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from tc import vocab
from tc.io import atomic_path
from tc.params import UserError, check_fields, dataclass_from_dict, param

N_ACTIONS = 7  # left, right, forward, pickup, drop, toggle, done
# Largest value of any of the three image channels (object, colour, state) plus one.
IMAGE_VALUES = max(len(OBJECT_TO_IDX), len(COLOR_TO_IDX), len(STATE_TO_IDX))


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of an :class:`Agent`; saved in every checkpoint."""

    image_dim: int = param(128, ge=1)  # channels of the image features (and the FiLM output)
    memory_dim: int = param(256, ge=1)  # LSTM memory of each level (paper: 2048)
    instr_dim: int = param(128, ge=2)  # word encodings, attention and decoder width (paper: 256)
    attn_heads: int = param(4, ge=1, thoughts=True)  # heads of the upper level's cross attention
    # Not in params.yaml: set by the agent kind and the vocabulary.
    use_thoughts: bool = param(True, in_params=False)  # False: BC baseline, the lower level on the mission only
    vocab_size: int = param(vocab.VOCAB_SIZE, ge=1, in_params=False)
    max_thought_len: int = param(vocab.MAX_THOUGHT_LEN, ge=1, in_params=False)

    def __post_init__(self):
        check_fields(self, "model")
        if self.instr_dim % 2 or self.instr_dim % self.attn_heads:
            raise ValueError(
                f"model.instr_dim ({self.instr_dim}) must be even (two GRU directions) "
                f"and divisible by model.attn_heads ({self.attn_heads})"
            )

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """Build from a params/checkpoint dict, naming unknown keys."""
        return dataclass_from_dict(cls, d, "model")

    def to_dict(self) -> dict:
        return asdict(self)


class ActOutput(NamedTuple):
    logits: Tensor  # [B, N_ACTIONS]
    thoughts: Tensor | None  # [B, max_thought_len] token ids used this step; None for BC
    state: dict[str, Tensor]


# ----------------------------------------------------------------------------- blocks


class ImageStem(nn.Module):
    """Bag-of-words embedding of the 7x7x3 symbolic image, then two 3x3 convolutions."""

    def __init__(self, dim: int):
        super().__init__()
        # One embedding table for the three channels; channel c uses rows c*IMAGE_VALUES + value.
        self.embedding = nn.Embedding(3 * IMAGE_VALUES, dim)
        self.register_buffer("offsets", torch.arange(3) * IMAGE_VALUES, persistent=False)
        self.convs = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1), nn.BatchNorm2d(dim), nn.ReLU(),
            nn.Conv2d(dim, dim, 3, padding=1), nn.BatchNorm2d(dim), nn.ReLU(),
        )

    def forward(self, images: Tensor) -> Tensor:
        """uint8/long [N, 7, 7, 3] -> float [N, dim, 7, 7]."""
        x = self.embedding(images.long() + self.offsets).sum(3)  # [N, 7, 7, dim]
        return self.convs(x.permute(0, 3, 1, 2))  # NCHW shape, NHWC (channels-last) memory


class FiLMBlock(nn.Module):
    """conv-BN-ReLU-conv, then feature-wise affine modulation by ``cond``, BN, ReLU, residual.

    ``features`` (the two convolutions) does not depend on ``cond``, so callers may run it
    on many frames at once and pass the result to ``forward``.
    """

    def __init__(self, dim: int, cond_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(dim)
        self.gamma = nn.Linear(cond_dim, dim)
        self.beta = nn.Linear(cond_dim, dim)

    def features(self, x: Tensor) -> Tensor:
        return self.conv2(F.relu(self.bn1(self.conv1(x))))

    def forward(self, x: Tensor, cond: Tensor, feats: Tensor | None = None) -> Tensor:
        feats = self.features(x) if feats is None else feats
        out = feats * self.gamma(cond)[:, :, None, None] + self.beta(cond)[:, :, None, None]
        # Out-of-place residual: the public code's in-place `out += x` breaks backward.
        return F.relu(self.bn2(out)) + x


class WordEncoder(nn.Module):
    """Bidirectional GRU over token ids (packed, so padding does not leak into either direction)."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=vocab.PAD)
        self.gru = nn.GRU(dim, dim // 2, batch_first=True, bidirectional=True)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """tokens long [N, L] -> (word encodings [N, L, dim], mask bool [N, L], summary [N, dim]).

        An all-<pad> row (no thought yet) gets zero encodings and a zero summary.
        """
        mask = tokens != vocab.PAD
        if tokens.shape[0] == 0:  # no rows (a data-parallel rank whose episodes have ended): packing refuses them
            out = self.embedding(tokens)
            return out, mask, out.new_zeros(0, out.shape[2])
        lengths = mask.sum(1)
        packed = pack_padded_sequence(
            self.embedding(tokens), lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False
        )
        out, h_n = self.gru(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])
        summary = torch.cat([h_n[0], h_n[1]], 1) * (lengths > 0).unsqueeze(1)
        return out * mask.unsqueeze(2), mask, summary


def encode_unique(encoder: WordEncoder, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``encoder(tokens)`` computed once per distinct row: a thought lasts many steps."""
    uniq, inverse = torch.unique(tokens, dim=0, return_inverse=True)
    out, mask, summary = encoder(uniq)
    return out[inverse], mask[inverse], summary[inverse]


def per_step(sizes: list[int], *tensors: Tensor) -> zip:
    """Iterate over the steps of time-major ``tensors``: yields (n, rows of each tensor).

    ``split`` rather than slicing: the backward of a slice writes a zero tensor as large
    as the whole input, per step; that of ``split`` concatenates the gradients once.
    """
    return zip(sizes, *(t.split(sizes) for t in tensors))


def episode_rows(sizes: list[int], device: torch.device) -> Tensor:
    """Episode index (position in the batch) of every row of the time-major layout."""
    return torch.cat([torch.arange(n, device=device) for n in sizes])


class GradTape:
    """Sums the gradient of a weight used at every step of a recurrence in one matmul.

    Autograd would build and add a full [out, in] gradient matrix at every step: for a
    2048-wide LSTM that is ~200 MB of memory traffic per step, which dominates CPU training
    time. The tape keeps each step's (input, output gradient) instead; the last of the
    steps' backward calls (``pending`` reaches 0) returns the whole sum. Every taped step
    must reach the loss (true here: each step's memory feeds a head), or the weight would
    get no gradient. One tape per forward pass.
    """

    def __init__(self):
        self.pending = 0
        self.inputs: list[Tensor] = []
        self.grads: list[Tensor] = []


class _TapedMatmul(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x: Tensor, weight: Tensor, tape: GradTape) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.tape = tape
        tape.pending += 1
        return x.mm(weight.t())

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        tape = ctx.tape
        tape.inputs.append(x)
        tape.grads.append(grad)
        tape.pending -= 1
        grad_weight = None
        if tape.pending == 0:
            grad_weight = torch.cat(tape.grads).t().mm(torch.cat(tape.inputs))
            tape.inputs, tape.grads = [], []
        grad_x = grad.mm(weight) if ctx.needs_input_grad[0] else None
        return grad_x, grad_weight, None


def taped_linear(x: Tensor, weight: Tensor, tape: GradTape | None) -> Tensor:
    """``x @ weight.T``, through ``tape`` when autograd records (training)."""
    if tape is None or not torch.is_grad_enabled():
        return x.mm(weight.t())
    return _TapedMatmul.apply(x, weight, tape)


def lstm_step(cell: nn.LSTMCell, x_gates: Tensor, h: Tensor, c: Tensor, tape: GradTape | None) -> tuple[Tensor, Tensor]:
    """One step of ``cell`` (same maths as ``nn.LSTMCell``) given the input's gate term
    ``x @ W_ih.T + b_ih + b_hh``; the recurrent weight's gradient goes through ``tape``."""
    gates = x_gates + taped_linear(h, cell.weight_hh, tape)
    i, f, g, o = gates.chunk(4, 1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def input_gates(cell: nn.LSTMCell, x: Tensor, tape: GradTape | None = None) -> Tensor:
    return taped_linear(x, cell.weight_ih, tape) + (cell.bias_ih + cell.bias_hh)


def run_lstm(cell: nn.LSTMCell, x: Tensor, sizes: list[int], h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Step ``cell`` through the time-major rows ``x``; returns (outputs [N, H], h, c).

    The input term is computed for all rows at once. The returned state has
    ``sizes[-1]`` rows: the episodes still running.
    """
    x_gates = input_gates(cell, x)
    tape = GradTape()
    outs = []
    for n, x_n in per_step(sizes, x_gates):
        h, c = lstm_step(cell, x_n, h[:n], c[:n], tape)
        outs.append(h)
    return torch.cat(outs), h, c


# ----------------------------------------------------------------------------- levels


class ActionGenerator(nn.Module):
    """Lower level: the BabyAI 1.1 agent; conditioned on (thought + mission) or the mission only."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.words = WordEncoder(cfg.vocab_size, cfg.instr_dim)
        self.stem = ImageStem(cfg.image_dim)
        self.films = nn.ModuleList([FiLMBlock(cfg.image_dim, cfg.instr_dim) for _ in range(2)])
        self.memory_to_key = nn.Linear(cfg.memory_dim, cfg.instr_dim)
        self.memory = nn.LSTMCell(cfg.image_dim, cfg.memory_dim)
        self.actor = nn.Sequential(nn.Linear(cfg.memory_dim, 64), nn.Tanh(), nn.Linear(64, N_ACTIONS))

    def forward(
        self,
        images: Tensor,
        sizes: list[int],
        mission_words: Tensor,
        mission_mask: Tensor,
        state: dict[str, Tensor],
        thoughts: Tensor | None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Action logits [N, 7] for the time-major rows; new state (rows still running)."""
        stem = self.stem(images)
        feats1 = self.films[0].features(stem)  # independent of the memory: all frames at once
        steps = per_step(sizes, stem, feats1)
        if thoughts is not None:
            t_words, t_mask, _ = encode_unique(self.words, thoughts)
            steps = per_step(sizes, stem, feats1, t_words, t_mask)
        h, c = state["low_h"], state["low_c"]
        tape_ih, tape_hh = GradTape(), GradTape()
        outs = []
        for n, stem_n, feats_n, *thought_n in steps:
            h, c = h[:n], c[:n]
            words, mask = mission_words[:n], mission_mask[:n]
            if thoughts is not None:
                words = torch.cat([thought_n[0], words], 1)
                mask = torch.cat([thought_n[1], mask], 1)
            # Attention over the words, keyed by the memory (BabyAI 1.1's "attgru").
            scores = torch.einsum("nld,nd->nl", words, self.memory_to_key(h)).masked_fill(~mask, float("-inf"))
            cond = torch.einsum("nl,nld->nd", scores.softmax(1), words)
            x = self.films[0](stem_n, cond, feats_n)
            x = self.films[1](x, cond)
            h, c = lstm_step(self.memory, input_gates(self.memory, x.amax((2, 3)), tape_ih), h, c, tape_hh)
            outs.append(h)
        return self.actor(torch.cat(outs)), {"low_h": h, "low_c": c}


class ThoughtGenerator(nn.Module):
    """Upper level: writes a thought (a short token sequence) at every step."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.instr_dim
        self.max_len = cfg.max_thought_len
        self.words = WordEncoder(cfg.vocab_size, d)
        self.history = nn.LSTMCell(d, d)
        self.cross_attn = nn.MultiheadAttention(d, cfg.attn_heads, batch_first=True)
        self.attn_norm = nn.LayerNorm(d)
        self.stem = ImageStem(cfg.image_dim)
        self.films = nn.ModuleList([FiLMBlock(cfg.image_dim, d) for _ in range(2)])
        self.memory = nn.LSTMCell(cfg.image_dim, cfg.memory_dim)
        # Decoder: a GRU cell started from (and fed at every token) a projection of the memory.
        self.dec_init = nn.Linear(cfg.memory_dim, d)
        self.dec_context = nn.Linear(cfg.memory_dim, d)
        self.dec_embedding = nn.Embedding(cfg.vocab_size, d, padding_idx=vocab.PAD)
        self.decoder = nn.GRUCell(2 * d, d)
        self.dec_out = nn.Linear(d, cfg.vocab_size)

    def scan_history(
        self, thoughts: Tensor, prev: Tensor, sizes: list[int], h: Tensor, c: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Push each row's thought into the history when it differs from the previous step's.

        Returns (history *before* each row's push [N, d], h, c). A thought lasting many
        steps is pushed once, so the history holds the sequence of distinct thoughts.
        """
        _, _, vecs = encode_unique(self.words, thoughts)
        changed = (thoughts != prev).any(1, keepdim=True)
        before = []
        for n, vecs_n, changed_n in per_step(sizes, vecs, changed):
            h, c = h[:n], c[:n]
            before.append(h)
            h2, c2 = self.history(vecs_n, (h, c))
            h, c = torch.where(changed_n, h2, h), torch.where(changed_n, c2, c)
        return torch.cat(before), h, c

    def features(self, images: Tensor, history: Tensor, mission_words: Tensor, mission_mask: Tensor) -> Tensor:
        """Image features FiLM-fused with (thought history x mission) attention; all rows at once."""
        if history.shape[0] == 0:  # no rows (a data-parallel rank whose episodes have ended): attention refuses them
            ctx = history.unsqueeze(1)
        else:
            ctx, _ = self.cross_attn(
                history.unsqueeze(1), mission_words, mission_words, key_padding_mask=~mission_mask, need_weights=False
            )
        cond = self.attn_norm(history + ctx.squeeze(1))
        x = self.stem(images)
        for film in self.films:
            x = film(x, cond)
        return x.amax((2, 3))

    def _decoder_start(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        return torch.tanh(self.dec_init(memory)), self.dec_context(memory)

    def decode_teacher_forced(self, memory: Tensor, targets: Tensor) -> Tensor:
        """Logits [N, L, V] of each target token given the previous ground-truth tokens."""
        hid, ctx = self._decoder_start(memory)
        bos = torch.full_like(targets[:, :1], vocab.BOS)
        inputs = self.dec_embedding(torch.cat([bos, targets[:, :-1]], 1))
        logits = []
        for k in range(targets.shape[1]):
            hid = self.decoder(torch.cat([inputs[:, k], ctx], 1), hid)
            logits.append(self.dec_out(hid))
        return torch.stack(logits, 1)

    def decode_greedy(self, memory: Tensor) -> Tensor:
        """Most likely thought [N, max_len], <eos>-terminated and <pad>-padded; stops early when all rows ended."""
        hid, ctx = self._decoder_start(memory)
        out = torch.full((memory.shape[0], self.max_len), vocab.PAD, dtype=torch.long, device=memory.device)
        tok = torch.full((memory.shape[0],), vocab.BOS, dtype=torch.long, device=memory.device)
        done = torch.zeros(memory.shape[0], dtype=torch.bool, device=memory.device)
        for k in range(self.max_len):
            hid = self.decoder(torch.cat([self.dec_embedding(tok), ctx], 1), hid)
            tok = self.dec_out(hid).argmax(1)
            out[:, k] = torch.where(done, vocab.PAD, tok)
            done = done | (tok == vocab.EOS)
            if bool(done.all()):
                break
        return out


# ----------------------------------------------------------------------------- agent


class Agent(nn.Module):
    """Thought Cloning agent (``cfg.use_thoughts``) or BC baseline; see the module docstring."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.lower = ActionGenerator(cfg)
        self.upper = ThoughtGenerator(cfg) if cfg.use_thoughts else None
        # Channels-last convolution weights: the image stem already yields NHWC tensors, and
        # oneDNN's NHWC kernels ran a 128-channel 7x7 conv (forward + backward) ~20% faster here.
        self.to(memory_format=torch.channels_last)

    def encode_mission(self, missions: Tensor) -> dict[str, Tensor]:
        """Word encodings of the missions [B, M] (once per episode), batch-first."""
        missions = missions.long()
        words, mask, _ = self.lower.words(missions)
        enc = {"low_words": words, "mask": mask}
        if self.upper is not None:
            enc["up_words"] = self.upper.words(missions)[0]
        return enc

    def initial_state(self, batch_size: int, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """Zero memories (and, for TC, an empty thought history), batch-first."""
        zeros = lambda dim: torch.zeros(batch_size, dim, device=device)  # noqa: E731
        state = {"low_h": zeros(self.cfg.memory_dim), "low_c": zeros(self.cfg.memory_dim)}
        if self.upper is not None:
            d = self.cfg.instr_dim
            state.update(up_h=zeros(self.cfg.memory_dim), up_c=zeros(self.cfg.memory_dim), hist_h=zeros(d), hist_c=zeros(d))
            state["prev_thought"] = torch.full((batch_size, self.cfg.max_thought_len), vocab.PAD, dtype=torch.long, device=device)
        return state

    def _pad_thoughts(self, thoughts: Tensor) -> Tensor:
        thoughts = thoughts.long()
        extra = self.cfg.max_thought_len - thoughts.shape[1]
        if extra < 0:
            raise ValueError(f"thoughts have {thoughts.shape[1]} tokens, more than max_thought_len={self.cfg.max_thought_len}")
        return F.pad(thoughts, (0, extra), value=vocab.PAD)

    @torch.no_grad()
    def act(
        self,
        images: Tensor,
        directions: Tensor,
        mission_enc: dict[str, Tensor],
        state: dict[str, Tensor],
        thoughts: Tensor | None = None,
    ) -> ActOutput:
        """One step for B environments.

        ``thoughts`` [B, L], when given, are used instead of generated ones (oracle thoughts,
        human steering). ``directions`` is accepted for the interface but unused: the
        egocentric 7x7 view already fixes the agent's heading (as in BabyAI 1.1).
        """
        del directions
        B = images.shape[0]
        new_state: dict[str, Tensor] = {}
        if self.upper is not None:
            up = self.upper
            x = up.features(images, state["hist_h"], mission_enc["up_words"], mission_enc["mask"])
            h, c = lstm_step(up.memory, input_gates(up.memory, x), state["up_h"], state["up_c"], None)
            thoughts = up.decode_greedy(h) if thoughts is None else self._pad_thoughts(thoughts)
            _, hist_h, hist_c = up.scan_history(thoughts, state["prev_thought"], [B], state["hist_h"], state["hist_c"])
            new_state.update(up_h=h, up_c=c, hist_h=hist_h, hist_c=hist_c, prev_thought=thoughts)
        else:
            thoughts = None
        logits, low = self.lower(images, [B], mission_enc["low_words"], mission_enc["mask"], state, thoughts)
        new_state.update(low)
        return ActOutput(logits, thoughts, new_state)

    def thought_step(
        self, images: Tensor, sizes: list[int], thoughts: Tensor, prev: Tensor, mission_enc: dict, state: dict
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Training pass of the upper level over time-major rows, ground-truth thought history.

        Returns (memory outputs [N, memory_dim] for the decoder, new upper state). The
        upper level never sees the lower level, so it runs first over a whole chunk.
        """
        up = self.upper
        rows = episode_rows(sizes, images.device)
        history, hist_h, hist_c = up.scan_history(thoughts, prev, sizes, state["hist_h"], state["hist_c"])
        x = up.features(images, history, mission_enc["up_words"][rows], mission_enc["mask"][rows])
        memory, h, c = run_lstm(up.memory, x, sizes, state["up_h"], state["up_c"])
        return memory, {"up_h": h, "up_c": c, "hist_h": hist_h, "hist_c": hist_c}


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- checkpoints

class CheckpointError(UserError, ValueError):
    """A checkpoint file that cannot be used: unreadable, of another format or vocabulary."""


CHECKPOINT_FORMAT = "thought-cloning-agent"
CHECKPOINT_VERSION = 1


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
        raise CheckpointError(f"{path} has checkpoint format version {ckpt.get('format_version')}, this code reads {CHECKPOINT_VERSION}")
    if ckpt.get("vocab_version") != vocab.VOCAB_VERSION:
        raise CheckpointError(f"{path} was trained with vocabulary version {ckpt.get('vocab_version')}, this code has {vocab.VOCAB_VERSION}")
    return ckpt


def check_config(path, ckpt: dict, expected: ModelConfig) -> None:
    """Raise ValueError naming ``path`` and every field where the checkpoint's config differs."""
    saved = ckpt["model_config"]
    diff = {k: (saved.get(k), v) for k, v in expected.to_dict().items() if saved.get(k) != v}
    diff.update({k: (saved[k], None) for k in saved.keys() - expected.to_dict().keys()})
    if diff:
        text = ", ".join(f"{k}: checkpoint {a!r} vs expected {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"{path} holds a different model architecture ({text})")


def load_agent(path, map_location="cpu", expected: ModelConfig | None = None) -> Agent:
    """Rebuild the :class:`Agent` saved in ``path``; with ``expected``, its config must match."""
    ckpt = load_checkpoint(path, map_location)
    if expected is not None:
        check_config(path, ckpt, expected)
    try:
        cfg = ModelConfig.from_dict(ckpt["model_config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} has an invalid model config: {e}") from e
    agent = Agent(cfg)
    missing, unexpected = agent.load_state_dict(ckpt["model"], strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit the {'TC' if cfg.use_thoughts else 'BC'} architecture of this code: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    return agent.to(map_location)
