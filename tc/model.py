"""The Thought Cloning agent of the paper (two levels sharing their perception) and the BC baseline.

Shared perception (:class:`Perception`), trained by both losses: a bag-of-words
embedding of the 7x7x3 symbolic view and two conv/BN/ReLU layers; ONE word embedding; a
bidirectional GRU for the mission and one for thoughts.

Upper level, the thought generator (:class:`ThoughtGenerator`), at every step:
  1. mission attention keyed by the previous upper memory (h, c);
  2. two REFER blocks: the thought history (h, c) queries the mission words (2-head cross
     attention + position-wise feed-forward, dropout); context = their output + (1);
  3. two FiLM blocks with residuals over the image features, max-pool, an LSTM cell memory;
  4. a decoder LSTM of the memory's width, started from the memory's (h, c), writes the
     thought (teacher-forced in training, greedy when acting);
  5. the thought (given or generated) is encoded, attended by a key of the new memory, and
     pushed into the history LSTM cell (every step).

Lower level, the action generator (:class:`ActionGenerator`, the BabyAI 1.1 agent): two
scaled attentions keyed by its previous memory (h, c), over the thought's words and over
the mission's words, each through its own linear map, summed; FiLM x2 with residuals,
max-pool, LSTM cell memory, actor MLP. BC is this level on the mission alone.

Paper size (image 128, memory 2048, instr 256): 82.2M parameters (TC), 20.4M (BC); the
public code has 82.5M / 20.6M, the difference being its unused critic head and instruction
embedding layer, and vocabulary / image-value table sizes.

Layout: the rows of a chunk of training steps are *time-major with a shrinking active set*
(tc.kernels): whatever does not depend on the recurrence (the image stem, the first FiLM
convolutions, word encodings of known thoughts, the decoder's teacher-forced pass, the
actor) runs once over all rows; the rest steps through time. The upper level never reads
the lower one, so it runs first over the whole chunk, then the lower level. Acting is the
same ``forward`` with one step.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import asdict, dataclass
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F
from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX, STATE_TO_IDX
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from tc import vocab
from tc.kernels import TapedLinear, TapedLSTMCell, compile_problem, first_rows, lstm_pointwise, per_step
from tc.params import check_fields, dataclass_from_dict, param

N_ACTIONS = 7  # left, right, forward, pickup, drop, toggle, done
# Largest value of any of the three image channels (object, colour, state) plus one.
IMAGE_VALUES = max(len(OBJECT_TO_IDX), len(COLOR_TO_IDX), len(STATE_TO_IDX))


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of an :class:`Agent`; saved in every checkpoint."""

    image_dim: int = param(128, ge=1)  # channels of the image features (paper: 128)
    memory_dim: int = param(256, ge=1)  # width of every LSTM: memories, thought history, decoder (paper: 2048)
    instr_dim: int = param(128, ge=2)  # word embeddings, encodings and attention width (paper: 256)
    attn_heads: int = param(2, ge=1, thoughts=True)  # heads of the REFER cross attention (paper: 2)
    dropout: float = param(0.2, ge=0, lt=1, thoughts=True)  # REFER blocks' dropout (paper: 0.2)
    attn_dropout: float = param(0.1, ge=0, lt=1)  # dropout on every attention's weights (paper: 0.1)
    # Not in params.yaml: set by the agent kind and the vocabulary.
    use_thoughts: bool = param(True, in_params=False)  # False: BC baseline, the action generator on the mission only
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


class AgentOutput(NamedTuple):
    logits: Tensor  # [N, N_ACTIONS] action logits
    thoughts: Tensor | None  # [N, max_thought_len] the thoughts acted on (given or generated); None for BC
    thought_logits: Tensor | None  # [K, vocab] teacher-forced logits of the K words of ``targets`` (see forward)
    state: dict[str, Tensor]
    memory: tuple[Tensor, Tensor] | None = None  # the upper level's (h, c) of every row, the decoder's start; None for BC


# ----------------------------------------------------------------------------- blocks


def babyai_init(module: nn.Module) -> None:
    """BabyAI's ``initialize_parameters``: Linear rows drawn N(0, 1) then scaled to unit norm, zero bias."""
    if isinstance(module, nn.Linear):
        with torch.no_grad():
            module.weight.normal_(0, 1)
            module.weight.div_(module.weight.norm(dim=1, keepdim=True))
            if module.bias is not None:
                module.bias.zero_()


class _Normalise(torch.autograd.Function):
    """BatchNorm's training transform ``y = (x - mean) * invstd * weight + bias`` with the batch
    statistics' own gradient written out: with xhat = (x - mean) * invstd and the sums over the
    rows (all ranks' under ``all_reduce``) and pixels of each channel,

        dx = weight * invstd * (dy - coef * (sum(dy) + xhat * sum(dy * xhat)))

    where ``coef`` is 1 / count: a number where every row counts, else a tensor of rows, 0
    for a row the statistics leave out.
    Autograd through the statistics' formula would launch ~55 kernels per call's backward (a
    training step has 3 BatchNorms per level), keep float64 copies of the input and record
    the mask's products; this backward takes ~13 kernels and keeps the input only.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, coef, all_reduce):
        scale = invstd * weight
        shift = torch.addcmul(bias, mean, scale, value=-1)
        rows = isinstance(coef, Tensor)
        ctx.save_for_backward(x, mean, invstd, scale, coef if rows else None)
        ctx.coef, ctx.all_reduce = None if rows else coef, all_reduce
        y = torch.addcmul(shift[:, None, None], x, scale[:, None, None])  # one pass over x
        # Cast only when needed: torch.compile in torch 2.11 (the GPU machine's; 2.13 is right) makes
        # every gradient of a Function whose forward returns a no-op .to() zero (tests/test_compile.py).
        return y if y.dtype == x.dtype else y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, mean, invstd, scale, row_coef = ctx.saved_tensors
        dy = dy.to(scale.dtype)
        # Fused multiply-adds (addcmul): each a single pass over the [N, C, H, W] tensors.
        xhat = torch.addcmul((-mean * invstd)[:, None, None], x, invstd[:, None, None])
        d_bias, d_weight = dy.sum((0, 2, 3)), (dy * xhat).sum((0, 2, 3))
        total = torch.cat([d_bias, d_weight])
        if ctx.all_reduce is not None:
            total = ctx.all_reduce(total)
        c = d_bias.shape[0]
        inner = torch.addcmul(total[:c, None, None], xhat, total[c:, None, None])
        dx = dy.add(inner, alpha=-ctx.coef) if row_coef is None else torch.addcmul(dy, row_coef, inner, value=-1)
        dx = dx * scale[:, None, None]
        return dx.to(x.dtype), d_weight, d_bias, None, None, None, None


class Counted(NamedTuple):
    """The rows of a fixed-shape chunk (tc.train.Padding) that BatchNorm's statistics count, with
    what its calls derive from them, made once per forward pass for all the chunk's steps and not
    at each of a step's 6 BatchNorm calls (4 operators each, a kernel launch each on a GPU).

    ``valid`` bool [n]; ``coef`` [n, 1, 1, 1], a row's weight in a mean over the counted rows of
    its step and their ``pixels`` (0: not counted); ``count`` [1], the pixels counted.
    """

    valid: Tensor
    coef: Tensor
    count: Tensor
    pixels: int

    @classmethod
    def of(cls, valid: Tensor, steps: int, pixels: int, dtype: torch.dtype) -> Counted:
        """``valid`` [steps * n], time-major, each step's rows counted over that step."""
        rows = valid.view(steps, -1)
        count = rows.sum(1, dtype=dtype) * pixels
        return cls(valid, (rows / count.clamp(min=1)[:, None]).view(-1, 1, 1, 1), count, pixels)

    def split(self, sizes: list[int]) -> list[Counted]:
        """Per step (tc.kernels.per_step), each step one of :meth:`of`'s ``steps``."""
        if len(sizes) != self.count.shape[0] or len(set(sizes)) > 1:
            raise ValueError(f"Counted rows of {self.count.shape[0]} equal steps, split into {sizes}")
        parts = zip(self.valid.split(sizes), self.coef.split(sizes), self.count.split(1))
        return [Counted(*part, self.pixels) for part in parts]


def all_rows(valid: Tensor | Counted | None) -> Tensor | None:
    """The bool rows of ``valid``, for a call over all the rows of a chunk at once."""
    return valid.valid if isinstance(valid, Counted) else valid


class BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose running statistics weigh every training frame of an update the same.

    In training each call is normalised by its own rows' statistics, as ``nn.BatchNorm2d``
    does. But the per-step layers are called once per time step with only the episodes
    still running (1-2 rows at the end of a long episode), and ``nn.BatchNorm2d``'s running
    average would come from the last few calls of the last batch, which evaluation then
    uses. Here the calls only add up per-channel sums; :meth:`commit` (once per optimiser
    step) folds the statistics of all the update's frames into the running ones.
    ``all_reduce`` sums the statistics, and their gradient's sums, over data-parallel
    ranks (tc.distributed); None: one process.

    With one process, eager calls keep their statistics in ``pending`` and :meth:`fold` adds
    them all to ``update_sums`` at the end of the agent's forward pass (and at
    :meth:`commit`): adding them at every call would take 5 operators (each a kernel launch
    on a GPU) per call, 6 calls per TC time step; the fold takes ~10 per module and pass.
    """

    all_reduce = None

    def __init__(self, num_features: int):
        super().__init__(num_features)
        self.register_buffer("update_sums", torch.zeros(2 * num_features + 1, dtype=torch.float64), persistent=False)
        self.pending: list[tuple[Tensor, Tensor, int | Tensor]] = []  # (mean, var, count) of calls not yet folded

    def forward(self, x: Tensor, valid: Tensor | Counted | None = None) -> Tensor:
        """``valid`` bool [N] or :class:`Counted`: the rows whose statistics count (fixed-shape
        chunks, tc.train.Padding); the other rows are normalised with them but add nothing.
        None: every row."""
        if not self.training:
            return super().forward(x)
        c, dims = self.num_features, (0, 2, 3)
        dtype = torch.promote_types(x.dtype, self.weight.dtype)  # float32 under bfloat16 autocast
        with torch.no_grad():  # the statistics' part of the gradient is _Normalise's
            if self.all_reduce is None:
                # One process: the mean, then the variance around it, in float32 (exact enough, as
                # E[x^2] - E[x]^2 is not taken), in few ops: each op is a kernel launch on a GPU,
                # and a time step makes 3 BatchNorm calls per level.
                xf = x.to(dtype)
                if valid is None:
                    count = x.numel() // c
                    coef = 1 / count
                    var, mean = torch.var_mean(xf, dims, correction=0)  # one fused reduction
                else:
                    pixels = x.shape[2] * x.shape[3]
                    if not isinstance(valid, Counted):
                        valid = Counted.of(valid, 1, pixels, dtype)
                    elif valid.pixels != pixels:
                        raise ValueError(f"Counted rows of {valid.pixels} pixels for maps of {pixels}")
                    count, coef = valid.count, valid.coef
                    mean = (xf * coef).sum(dims)
                    var = ((xf - mean[:, None, None]).square() * coef).sum(dims)
                if torch.compiler.is_compiling():  # compiled (train.compile): the update fuses with the step's kernels
                    self._add(mean[None], var[None], count)
                else:
                    self.pending.append((mean, var, count))
            else:
                # Data-parallel: the sums of x and x^2 over all ranks' rows, in float64, where
                # E[x^2] - E[x]^2 loses nothing.
                x64 = x.double()
                valid = all_rows(valid)
                if valid is None:
                    count = x.new_full((1,), x.numel() // c, dtype=torch.float64)
                    weighted = x64
                else:
                    count = valid.sum(0, keepdim=True, dtype=torch.float64) * (x.shape[2] * x.shape[3])
                    weighted = x64 * valid[:, None, None, None]
                sums = self.all_reduce(torch.cat([weighted.sum(dims), (weighted * x64).sum(dims), count]))
                self.update_sums += sums
                n = sums[2 * c].clamp(min=1)
                mean = sums[:c] / n
                var = (sums[c : 2 * c] / n - mean * mean).clamp(min=0).to(dtype)
                mean, coef = mean.to(dtype), (1 / n if valid is None else valid[:, None, None, None] / n).to(dtype)
        return _Normalise.apply(x, self.weight, self.bias, mean, torch.rsqrt(var + self.eps), coef, self.all_reduce)

    def _add(self, means: Tensor, variances: Tensor, counts: int | Tensor) -> None:
        """Add the statistics of calls (``means``, ``variances`` [calls, C], frames ``counts``: one
        number, or [calls]) to ``update_sums``: the sums of x and x^2 and the frames."""
        c = self.num_features
        weight = counts.reshape(-1, 1) if isinstance(counts, Tensor) else counts
        terms = torch.cat([means, torch.addcmul(variances, means, means)], 1) * weight  # float32, as per call
        self.update_sums[: 2 * c].add_(terms.sum(0, dtype=torch.float64))
        self.update_sums[2 * c :].add_(counts.sum(dtype=torch.float64) if isinstance(counts, Tensor) else counts)

    @torch.no_grad()
    def fold(self) -> None:
        """Add the statistics of the calls in ``pending`` to ``update_sums``, in one pass."""
        if not self.pending:
            return
        means, variances, counts = zip(*self.pending)
        self.pending = []
        means, variances = torch.stack(means), torch.stack(variances)
        if all(isinstance(n, int) for n in counts):  # the shrinking layout: one copy to the device
            counts = torch.tensor(counts, dtype=means.dtype, device=means.device)
        else:
            counts = torch.stack([torch.as_tensor(n, dtype=means.dtype, device=means.device) for n in counts])
        self._add(means, variances, counts)

    @torch.no_grad()
    def commit(self) -> None:
        """Fold the frames seen since the last commit into the running statistics (unbiased variance)."""
        self.fold()
        c, n = self.num_features, self.update_sums[-1]
        if n > 1:
            mean = self.update_sums[:c] / n
            var = (self.update_sums[c : 2 * c] / n - mean * mean).clamp(min=0) * n / (n - 1)
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_(var.to(self.running_var.dtype), self.momentum)
            self.num_batches_tracked.add_(1)
        self.update_sums.zero_()


def commit_batchnorm(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, BatchNorm2d):
            m.commit()


@contextlib.contextmanager
def batchnorm_uncounted(module: nn.Module) -> Iterator[None]:
    """Inside, BatchNorm normalises with each call's statistics as always, but what the calls add to
    the update's statistics is taken back on the way out: for a pass that only carries the state
    forward (tc.train's ``layout: chunks``), whose frames the pass with gradients counts."""
    norms = [m for m in module.modules() if isinstance(m, BatchNorm2d)]
    kept = [(m.update_sums.clone(), list(m.pending)) for m in norms]
    try:
        yield
    finally:
        for m, (sums, pending) in zip(norms, kept):
            m.update_sums.copy_(sums)
            m.pending = pending


def fold_batchnorm(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, BatchNorm2d):
            m.fold()


def conv_bn(dim: int) -> list[nn.Module]:
    return [nn.Conv2d(dim, dim, 3, padding=1), BatchNorm2d(dim)]


class FiLMBlock(nn.Module):
    """conv-BN-ReLU-conv, feature-wise affine modulation (``gamma``, ``beta``: linear maps of the
    conditioning), BN, ReLU; plus the input (residual).

    ``features`` (the convolutions) does not depend on the conditioning: callers may run it on
    many frames at once and pass the result to ``forward``.
    """

    def __init__(self, dim: int, cond_dim: int):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(dim)
        self.conv2, self.bn2 = conv_bn(dim)
        self.gamma = nn.Linear(cond_dim, dim)
        self.beta = nn.Linear(cond_dim, dim)

    def features(self, x: Tensor, valid: Tensor | Counted | None = None) -> Tensor:
        return self.conv2(F.relu(self.bn1(self.conv1(x), valid)))

    def forward(self, x: Tensor, gamma: Tensor, beta: Tensor, feats: Tensor | None = None,
                valid: Tensor | Counted | None = None) -> Tensor:  # fmt: skip
        """``gamma``, ``beta`` [n, dim, 1, 1]: this block's maps of the conditioning (:func:`film_pool`)."""
        feats = self.features(x, valid) if feats is None else feats
        out = feats * gamma + beta
        # Out-of-place residual: the public code's in-place `out += x` breaks backward.
        return F.relu(self.bn2(out, valid)) + x


def film_modulation(films: nn.ModuleList, tape: bool) -> TapedLinear:
    """The four linear maps of the conditioning in two FiLM blocks (gamma and beta of each), as one
    matmul per step (:func:`film_pool`); ``tape``: see :class:`TapedLinear`."""
    return TapedLinear(*(m for film in films for m in (film.gamma, film.beta)), tape=tape)


def film_pool(films: nn.ModuleList, modulation: TapedLinear, x: Tensor, cond: Tensor, feats: Tensor,
              valid: Tensor | Counted | None = None) -> Tensor:  # fmt: skip
    """Both FiLM blocks (the first one's convolutions precomputed, their maps of ``cond`` from
    :func:`film_modulation`), then the 7x7 max-pool.

    The paper applies a ReLU after the pool; the pooled values are sums of ReLU outputs,
    already >= 0, so it is left out.
    """
    gamma0, beta0, gamma1, beta1 = modulation(cond)[:, :, None, None].chunk(4, 1)
    return films[1](films[0](x, gamma0, beta0, feats, valid), gamma1, beta1, None, valid).amax((2, 3))


def attend(key: Tensor, words: Tensor, pads: Tensor, dropout: float, training: bool) -> Tensor:
    """Scaled dot-product attention of one query per row over its words (``pads``: True at padding):
    [n, d] x [n, L, d] -> [n, d]."""
    scores = torch.bmm(words, key.unsqueeze(2)).squeeze(2) / math.sqrt(key.shape[1])
    weights = F.dropout(scores.masked_fill(pads, float("-inf")).softmax(1), dropout, training)
    return torch.bmm(weights.unsqueeze(1), words).squeeze(1)


class ReferBlock(nn.Module):
    """Multi-head cross attention of one query over the mission words, then a position-wise
    feed-forward layer; each sublayer with dropout, a residual and LayerNorm (post-norm).

    The paper's block does not mask the padding of the mission words (pads are encoded as
    zeros and still draw weight, by an amount that depends on the batch's longest mission);
    here pads are masked, so a mission's encoding does not depend on its batch.
    """

    def __init__(self, d: int, heads: int, dropout: float, attn_dropout: float):
        super().__init__()
        self.heads, self.dropout, self.attn_dropout = heads, dropout, attn_dropout
        self.query, self.key, self.value, self.out = (nn.Linear(d, d) for _ in range(4))
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.ff1, self.ff2 = nn.Linear(d, d), nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)

    def taped(self, tape: bool) -> tuple[TapedLinear, ...]:
        """This block's per-step linear layers (query, out, ff1, ff2) for one forward pass:
        :meth:`forward`'s ``linears``; ``tape``: see :class:`TapedLinear`."""
        return tuple(TapedLinear(m, tape=tape) for m in (self.query, self.out, self.ff1, self.ff2))

    def keys_values(self, words: Tensor) -> tuple[Tensor, Tensor]:
        """Per-head keys and values of the mission words [B, L, d] -> [B, L, heads, d/heads] (once per episode)."""
        B, L, d = words.shape
        return self.key(words).view(B, L, self.heads, d // self.heads), self.value(words).view(B, L, self.heads, d // self.heads)

    def forward(self, query: Tensor, keys: Tensor, values: Tensor, pads: Tensor,
                linears: tuple[TapedLinear, ...]) -> Tensor:  # fmt: skip
        """``linears``: :meth:`taped`, made once per forward pass and used at every step."""
        to_query, out, ff1, ff2 = linears
        n, d = query.shape
        q = to_query(query).view(n, self.heads, d // self.heads)
        scores = torch.einsum("nhk,nlhk->nhl", q, keys) / math.sqrt(q.shape[2])
        weights = scores.masked_fill(pads[:, None, :], float("-inf")).softmax(2)
        weights = F.dropout(weights, self.attn_dropout, self.training)
        ctx = torch.einsum("nhl,nlhk->nhk", weights, values).reshape(n, d)
        x = self.norm1(F.dropout(out(ctx), self.dropout, self.training) + query)
        return self.norm2(F.dropout(ff2(F.relu(ff1(x))), self.dropout, self.training) + x)


# ----------------------------------------------------------------------------- perception


class Perception(nn.Module):
    """Observation encoder shared by both levels: image stem, word embedding, mission / thought GRUs."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.instr_dim
        # One table for the three image channels; channel k uses rows k * IMAGE_VALUES + value.
        self.image_embedding = nn.Embedding(3 * IMAGE_VALUES, cfg.image_dim)
        self.register_buffer("offsets", torch.arange(3) * IMAGE_VALUES, persistent=False)
        self.image_conv = nn.Sequential(*conv_bn(cfg.image_dim), nn.ReLU(), *conv_bn(cfg.image_dim), nn.ReLU())
        self.word_embedding = nn.Embedding(cfg.vocab_size, d, padding_idx=vocab.PAD)
        self.mission_rnn = nn.GRU(d, d // 2, batch_first=True, bidirectional=True)
        self.thought_rnn = nn.GRU(d, d // 2, batch_first=True, bidirectional=True) if cfg.use_thoughts else None

    def image(self, images: Tensor, valid: Tensor | None = None) -> Tensor:
        """uint8/long [N, 7, 7, 3] -> float [N, image_dim, 7, 7] (channels-last memory); ``valid``:
        the rows BatchNorm counts (None: all)."""
        x = self.image_embedding(images.long() + self.offsets).sum(3).permute(0, 3, 1, 2)
        for layer in self.image_conv:
            x = layer(x, valid) if isinstance(layer, BatchNorm2d) else layer(x)
        return x

    def words(self, tokens: Tensor, thoughts: bool, fixed: bool = False) -> tuple[Tensor, Tensor]:
        """tokens long [N, L] -> (encodings [N, L, d], pads bool [N, L]: True at padding, the form
        the attentions' masked_fill takes, so no step inverts it); packed, so padding leaks into
        neither direction; pad positions are zero. Computed once per distinct row.

        ``fixed``: the same encodings with no host synchronisation and shapes that depend on
        [N, L] alone (CUDA graphs): every row is encoded, and instead of packing, the GRU reads
        each row twice in one call, right-padded for its forward direction and rolled to be
        left-padded for its backward one, so that neither direction reaches a pad before a word.
        """
        rnn = self.thought_rnn if thoughts else self.mission_rnn
        if fixed:
            n, length = tokens.shape
            pads = tokens == vocab.PAD
            shift = pads.sum(1, keepdim=True)
            pos = torch.arange(length, device=tokens.device)[None, :]
            rolled = tokens.gather(1, (pos - shift) % length)  # row i: its pads, then its words
            out, _ = rnn(self.word_embedding(torch.cat([tokens, rolled])))
            half = out.shape[2] // 2
            back = out[n:, :, half:].gather(1, ((pos + shift) % length)[:, :, None].expand(n, length, half))
            return torch.cat([out[:n, :, :half], back], 2).masked_fill(pads.unsqueeze(2), 0), pads
        uniq, inverse = torch.unique(tokens, dim=0, return_inverse=True)
        mask = uniq != vocab.PAD
        emb = self.word_embedding(uniq)
        if uniq.shape[0] == 0:  # a data-parallel rank without rows: packing refuses them
            return emb[inverse], ~mask[inverse]
        lengths = mask.sum(1).clamp(min=1).cpu()
        out, _ = rnn(pack_padded_sequence(emb, lengths, batch_first=True, enforce_sorted=False))
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])
        return (out * mask.unsqueeze(2))[inverse], ~mask[inverse]


# ----------------------------------------------------------------------------- levels


def memory_input(h: Tensor, c: Tensor) -> Tensor:
    """The paper keys its attentions with the whole LSTM state (h, c)."""
    return torch.cat([h, c], 1)


class ThoughtGenerator(nn.Module):
    """Upper level: writes a thought at every step (see the module docstring)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, m = cfg.instr_dim, cfg.memory_dim
        self.cfg = cfg
        self.history = nn.LSTMCell(d, m)
        self.history_to_query = nn.Linear(2 * m, d)
        self.memory_to_key = nn.Linear(2 * m, d)  # mission attention
        self.memory_to_thought_key = nn.Linear(2 * m, d)  # attention over the thought pushed into the history
        self.refer = nn.ModuleList(ReferBlock(d, cfg.attn_heads, cfg.dropout, cfg.attn_dropout) for _ in range(2))
        self.films = nn.ModuleList(FiLMBlock(cfg.image_dim, d) for _ in range(2))
        self.memory = nn.LSTMCell(cfg.image_dim, m)
        self.decoder = nn.LSTMCell(d, m)
        self.decoder_out = nn.Linear(m, cfg.vocab_size)
        self.pointwise = lstm_pointwise  # or its compiled version (Agent.compile_steps)
        self.tape_condition = True  # False once `condition` is compiled (Agent.compile_steps)

    def forward(
        self, x0: Tensor, sizes: list[int], mission: dict[str, Tensor], state: dict[str, Tensor],
        thoughts: Tensor | None, perception: Perception, valid: Tensor | Counted | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """Step through the time-major rows ``x0`` (image features).

        ``thoughts`` [N, L]: the thoughts to push into the history (teacher forcing, oracle,
        steering); None: the level's own greedy thoughts (free running). Returns (thoughts,
        their word encodings and pads, memory h and c of every row, new state). ``valid``:
        see :meth:`Agent.forward` (in training, :class:`Counted` per step).
        """
        fixed = valid is not None
        feats = self.films[0].features(x0, all_rows(valid))  # independent of the recurrence: all rows at once
        words, pads = mission["words"], mission["pads"]
        kvs = [blk.keys_values(words) for blk in self.refer]
        memory, history = TapedLSTMCell(self.memory, self.pointwise), TapedLSTMCell(self.history, self.pointwise)
        to_query, to_key, to_thought_key = (TapedLinear(m) for m in (self.history_to_query, self.memory_to_key,
                                                                      self.memory_to_thought_key))
        tape = self.tape_condition
        linears = (*(blk.taped(tape) for blk in self.refer), film_modulation(self.films, tape))
        given = thoughts is not None
        if given:
            t_words, t_pads = perception.words(thoughts, True, fixed)  # all rows at once
            steps = per_step(sizes, x0, feats, valid, t_words, t_pads)
        else:
            steps = per_step(sizes, x0, feats, valid)
        h, c, hh, hc = state["up_h"], state["up_c"], state["hist_h"], state["hist_c"]
        hs, cs, generated = [], [], []
        for t, (n, x0_n, feats_n, valid_n, *thought_n) in enumerate(steps):
            h, c, hh, hc = first_rows(n, h, c, hh, hc)
            x = self.condition(to_query(memory_input(hh, hc)), to_key(memory_input(h, c)),
                               *first_rows(n, *(part for kv in kvs for part in kv), words, pads), x0_n, feats_n,
                               valid_n, linears)
            h, c = memory(x, h, c)
            if not given:
                tokens = self.decode_greedy(h, c, perception.word_embedding, early_stop=not fixed)
                thought_n = perception.words(tokens, True, fixed)
                generated.append((tokens, *thought_n))
            # The history after a chunk's last step only feeds the next chunk, through a
            # detached state: outside the graph (a taped weight must reach the loss at every use).
            with torch.set_grad_enabled(torch.is_grad_enabled() and t < len(sizes) - 1):
                hh, hc = history(self.attend(to_thought_key(memory_input(h, c)), *thought_n), hh, hc)
            hs.append(h)
            cs.append(c)
        if not given:
            thoughts, t_words, t_pads = (torch.cat(parts) for parts in zip(*generated))
        new_state = {"up_h": h, "up_c": c, "hist_h": hh, "hist_c": hc}
        return thoughts, t_words, t_pads, torch.cat(hs), torch.cat(cs), new_state

    def condition(
        self, query: Tensor, key: Tensor, k0: Tensor, v0: Tensor, k1: Tensor, v1: Tensor, words: Tensor,
        pads: Tensor, x0: Tensor, feats: Tensor, valid: Tensor | Counted | None, linears: tuple,
    ) -> Tensor:
        """One step's memory input: the REFER blocks (keys and values ``k0, v0, k1, v1``) and the
        mission attention give the FiLM conditioning of the image; pooled [n, image_dim].
        ``linears``: the REFER blocks' and the FiLM maps' linear layers (made once per forward
        pass). What :meth:`Agent.compile_steps` compiles.
        """
        *refer, modulation = linears
        for blk, k, v, lin in zip(self.refer, (k0, k1), (v0, v1), refer):
            query = blk(query, k, v, pads, lin)
        cond = query + attend(key, words, pads, self.cfg.attn_dropout, self.training)
        return film_pool(self.films, modulation, x0, cond, feats, valid)

    def attend(self, key: Tensor, words: Tensor, pads: Tensor) -> Tensor:
        """Attention over a thought's words (compiled with :meth:`condition`)."""
        return attend(key, words, pads, self.cfg.attn_dropout, self.training)

    def decode_teacher_forced(self, h: Tensor, c: Tensor, targets: Tensor, embedding: nn.Embedding) -> Tensor:
        """Logits [K, vocab] of each of the K words (and <eos>) of ``targets`` [N, L], in the order of
        ``targets[targets != PAD]``, each given the previous true words and the memory (h, c) of its row.

        Rows are sorted by thought length so that decoder step k runs only the rows that
        still have a word k (a thought has ~6 of the 16 positions), and each step's input
        gates are one contiguous block (a per-step slice's backward would zero-fill all).
        """
        lengths = (targets != vocab.PAD).sum(1)
        if targets.shape[0] == 0 or int(lengths.max()) == 0:  # no words (a data-parallel rank without rows)
            return self.decoder_out(h[:0])
        order = torch.argsort(lengths, descending=True, stable=True)
        sorted_len = lengths[order]
        L = int(sorted_len[0])
        inputs = torch.cat([torch.full_like(targets[:, :1], vocab.BOS), targets[:, : L - 1]], 1)[order]
        active = torch.arange(L, device=h.device)[:, None] < sorted_len[None, :]  # [L, N], token-major
        counts = active.sum(1)
        # The input gates of a word depend on the word alone: one row per vocabulary entry.
        cell = TapedLSTMCell(self.decoder, self.pointwise)
        gates = cell.input_gates(embedding.weight)[inputs.t()[active]]
        h, c = h[order], c[order]
        outs = []
        for n, gates_n in per_step(counts.tolist(), gates):
            h, c = cell.step(gates_n, *first_rows(n, h, c))
            outs.append(h)
        logits = self.decoder_out(torch.cat(outs))  # token-major: step k's rows, then step k + 1's...
        # Row i's word k sits at (first row of step k) + (position of i in the sorted order).
        starts = torch.cumsum(counts, 0) - counts
        position = torch.empty_like(order)
        position[order] = torch.arange(len(order), device=h.device)
        index = (starts[None, :] + position[:, None])[targets[:, :L] != vocab.PAD]
        return logits[index]

    @torch.no_grad()
    def decode_greedy(self, h: Tensor, c: Tensor, embedding: nn.Embedding, early_stop: bool = True) -> Tensor:
        """Most likely thought [n, max_len] from the memory (h, c): <eos>-terminated, <pad>-padded.

        <pad> and <bos> are never chosen. ``early_stop``: stop once every row has ended (a host
        synchronisation per word; without it, all max_len words are decoded, the same result).
        A word is its embedding, the cell, the scores and their argmax: on a GPU each operator
        is a launch, so the banned words are in the scores' bias and what follows a row's
        <eos> becomes <pad> once, after the loop.
        """
        n, max_len = h.shape[0], self.cfg.max_thought_len
        bias = self.decoder_out.bias.clone()
        for banned in (vocab.PAD, vocab.BOS):  # fill_: no index or value tensor made on the host (CUDA graphs)
            bias[banned].fill_(float("-inf"))
        tok = h.new_full((n,), vocab.BOS, dtype=torch.long)
        done = torch.zeros(n, dtype=torch.bool, device=h.device) if early_stop else None
        words = []
        for _ in range(max_len):
            h, c = self.decoder(embedding(tok), (h, c))
            tok = F.linear(h, self.decoder_out.weight, bias).argmax(1)
            words.append(tok)
            if early_stop:
                done |= tok == vocab.EOS
                if bool(done.all()):
                    break
        out = torch.stack(words, 1)
        eos = out == vocab.EOS
        out = out.masked_fill(eos.cumsum(1) > eos, vocab.PAD)  # an <eos> before this word
        return F.pad(out, (0, max_len - out.shape[1]), value=vocab.PAD) if out.shape[1] < max_len else out


class ActionGenerator(nn.Module):
    """Lower level: the BabyAI 1.1 agent, conditioned on (thought + mission) or, for BC, the mission only."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, m = cfg.instr_dim, cfg.memory_dim
        self.cfg = cfg
        # Keys of the thought and mission attentions from the memory (h, c): one matrix, one matmul per step.
        self.memory_to_keys = nn.Linear(2 * m, 2 * d if cfg.use_thoughts else d)
        self.thought_proj = nn.Linear(d, d) if cfg.use_thoughts else None
        self.mission_proj = nn.Linear(d, d)
        self.films = nn.ModuleList(FiLMBlock(cfg.image_dim, d) for _ in range(2))
        self.memory = nn.LSTMCell(cfg.image_dim, m)
        self.actor = nn.Sequential(nn.Linear(m, 64), nn.Tanh(), nn.Linear(64, N_ACTIONS))
        self.pointwise = lstm_pointwise  # or its compiled version (Agent.compile_steps)
        self.tape_condition = True  # False once `condition` is compiled (Agent.compile_steps)

    def forward(
        self, x0: Tensor, sizes: list[int], mission: dict[str, Tensor], state: dict[str, Tensor],
        thought_words: Tensor | None = None, thought_pads: Tensor | None = None,
        valid: Tensor | Counted | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Action logits [N, 7] for the time-major rows (image features ``x0``); new state.
        ``valid``: see :meth:`Agent.forward` (in training, :class:`Counted` per step)."""
        feats = self.films[0].features(x0, all_rows(valid))  # independent of the memory: all rows at once
        memory, to_keys = TapedLSTMCell(self.memory, self.pointwise), TapedLinear(self.memory_to_keys)
        tape = self.tape_condition
        linears = (TapedLinear(self.mission_proj, tape=tape),
                   TapedLinear(self.thought_proj, tape=tape) if self.thought_proj is not None else None,
                   film_modulation(self.films, tape))
        thinking = thought_words is not None
        steps = per_step(sizes, x0, feats, valid, *((thought_words, thought_pads) if thinking else ()))
        h, c = state["low_h"], state["low_c"]
        outs = []
        for n, x0_n, feats_n, valid_n, *thought_n in steps:
            h, c = first_rows(n, h, c)
            x = self.condition(to_keys(memory_input(h, c)), *first_rows(n, mission["words"], mission["pads"]), x0_n,
                               feats_n, valid_n, linears, *thought_n)
            h, c = memory(x, h, c)
            outs.append(h)
        return self.actor(torch.cat(outs)), {"low_h": h, "low_c": c}

    def condition(
        self, keys: Tensor, words: Tensor, pads: Tensor, x0: Tensor, feats: Tensor, valid: Tensor | Counted | None,
        linears: tuple, thought_words: Tensor | None = None, thought_pads: Tensor | None = None,
    ) -> Tensor:
        """One step's memory input: the mission (and thought) attentions keyed by ``keys`` give the
        FiLM conditioning of the image; pooled [n, image_dim]. ``linears``: the mission and thought
        projections and the FiLM maps (made once per forward pass). What
        :meth:`Agent.compile_steps` compiles."""
        p, d = self.cfg.attn_dropout, self.cfg.instr_dim
        mission_proj, thought_proj, modulation = linears
        *thought_key, mission_key = keys.split(d, 1)  # split: its backward is one cat, a slice's a zero-fill
        cond = mission_proj(attend(mission_key, words, pads, p, self.training))
        if thought_words is not None:
            cond = cond + thought_proj(attend(thought_key[0], thought_words, thought_pads, p, self.training))
        return film_pool(self.films, modulation, x0, cond, feats, valid)


# ----------------------------------------------------------------------------- agent


class Agent(nn.Module):
    """Thought Cloning agent (``cfg.use_thoughts``) or BC baseline; see the module docstring."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.perception = Perception(cfg)
        self.upper = ThoughtGenerator(cfg) if cfg.use_thoughts else None
        self.lower = ActionGenerator(cfg)
        self.apply(babyai_init)
        # Channels-last convolution weights: the image stem yields NHWC tensors, and oneDNN's
        # NHWC kernels ran a 128-channel 7x7 conv (forward + backward) ~20% faster here.
        self.to(memory_format=torch.channels_last)

    def compile_steps(self, mode: str = "default") -> str | None:
        """Compile, with ``torch.compile`` (dynamic shapes), what a time step does between the taped
        matmuls of its memories: each level's ``condition`` (attentions, FiLM, BatchNorm, pool,
        with their linear layers untaped), the thought attention and the LSTM cells' pointwise
        update, so that the step loop runs fewer, fused kernels (fewer launches on a GPU). The
        memories' taped matmuls and the loop stay eager.
        ``mode``: torch.compile's. The result equals the eager one up to float rounding
        (tests); dropout draws other masks. Returns None, or why torch.compile cannot run
        here (then nothing is compiled and the agent stays eager).
        """
        problem = compile_problem(next(self.parameters()).device, mode)
        if problem is not None:
            return problem
        # Each function is compiled for a few variants (grad mode, n = 1 or more rows,
        # thoughts given or not, views at offset 0 or not): more than dynamo's default of 8.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for level in filter(None, (self.upper, self.lower)):
            level.pointwise = torch.compile(lstm_pointwise, dynamic=True, mode=mode)
            level.condition = torch.compile(level.condition, dynamic=True, mode=mode)
            level.tape_condition = False  # dynamo cannot trace a tape's backward: autograd's gradients inside
        if self.upper is not None:
            self.upper.attend = torch.compile(self.upper.attend, dynamic=True, mode=mode)
        return None

    def encode_mission(self, missions: Tensor, fixed: bool = False) -> dict[str, Tensor]:
        """Word encodings of the missions [B, M] (once per episode), batch-first; ``fixed``: see
        :meth:`Perception.words`."""
        words, pads = self.perception.words(missions.long(), False, fixed)
        return {"words": words, "pads": pads}

    def initial_state(self, batch_size: int, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """Zero memories (and, for TC, an empty thought history), batch-first."""
        keys = ("low_h", "low_c") + (("up_h", "up_c", "hist_h", "hist_c") if self.upper is not None else ())
        return {k: torch.zeros(batch_size, self.cfg.memory_dim, device=device) for k in keys}

    def forward(
        self, images: Tensor, sizes: list[int], mission: dict[str, Tensor], state: dict[str, Tensor],
        thoughts: Tensor | None = None, targets: Tensor | None = None, valid: Tensor | None = None,
    ) -> AgentOutput:
        """Steps through the time-major rows of a chunk (``sizes[t]`` episodes at step t).

        ``thoughts`` [N, L]: what the upper level pushes into its history and the lower level
        acts on (teacher forcing, oracle, steering); None: the upper level's own greedy
        thoughts (free running, as at test time). ``targets`` [N, L]: thoughts whose
        teacher-forced decoder logits are returned (training). BC ignores both.

        ``valid`` bool [N]: a *fixed-shape* chunk (tc.train.Padding, for CUDA graphs): every
        step has the same rows, ``valid`` marks the real ones (the others are copies that
        BatchNorm and the loss leave out), and nothing synchronises with the host but the
        decoding of ``targets``, which runs on the real rows alone, at their own sizes:
        ``thought_logits`` are those of ``targets[valid]``'s words. Over padded rows it would
        run every position of the longest thought, ~2.4x its work per real frame (BossLevel:
        9 positions against ~5 words, 1.37 rows a frame) and half of a padded row's FLOPs; so
        CUDA graphs record the chunk without it and decode between the forward and the
        backward graph (tc.train.ChunkGraphs). Inside a CUDA graph the mission encodings
        must be fixed-shape too: ``encode_mission(..., fixed=True)``.
        """
        x0 = self.perception.image(images, valid)
        steps_valid = valid
        if valid is not None and self.training:  # what BatchNorm's calls at every step derive from it, once
            dtype = torch.promote_types(x0.dtype, self.perception.image_embedding.weight.dtype)  # BatchNorm's (float32 under autocast)
            steps_valid = Counted.of(valid, len(sizes), images.shape[1] * images.shape[2], dtype)
        thought_logits = t_words = t_pads = memory = None
        new_state: dict[str, Tensor] = {}
        if self.upper is not None:
            thoughts, t_words, t_pads, h, c, new_state = self.upper(x0, sizes, mission, state, thoughts, self.perception,
                                                                    steps_valid)
            memory = h, c
            if targets is not None:
                thought_logits = self.decode_thoughts(h, c, targets, valid)
        else:
            thoughts = None
        logits, low_state = self.lower(x0, sizes, mission, state, t_words, t_pads, steps_valid)
        if self.training:
            fold_batchnorm(self)  # inside the forward pass, so that a CUDA graph of it records the fold too
        return AgentOutput(logits, thoughts, thought_logits, {**new_state, **low_state}, memory)

    def decode_thoughts(self, h: Tensor, c: Tensor, targets: Tensor, valid: Tensor | None = None) -> Tensor:
        """Teacher-forced logits [K, vocab] of the K words of ``targets`` [N, L] (of the rows ``valid``
        marks, at their own sizes: a host synchronisation), each row from its upper memory (h, c)."""
        if valid is not None:
            rows = valid.nonzero().squeeze(1)
            h, c, targets = h[rows], c[rows], targets[rows]
        return self.upper.decode_teacher_forced(h, c, targets, self.perception.word_embedding)

    @torch.no_grad()
    def act(
        self,
        images: Tensor,
        directions: Tensor | None,
        mission: dict[str, Tensor],
        state: dict[str, Tensor],
        thoughts: Tensor | None = None,
        fixed: bool = False,
    ) -> AgentOutput:
        """One step for B environments (``forward`` with one step); never changes ``state``.

        ``thoughts`` [B, L], when given, are used instead of generated ones (oracle thoughts,
        human steering). ``directions`` is accepted for the interface but unused: the
        egocentric 7x7 view already fixes the agent's heading (as in BabyAI 1.1). ``fixed``:
        the fixed-shape path of :meth:`forward` (no host synchronisation: CUDA graphs), the
        same result (all rows count: in eval mode rows do not interact).
        """
        del directions
        if thoughts is not None:
            thoughts = thoughts.long()
            extra = self.cfg.max_thought_len - thoughts.shape[1]
            if extra < 0:
                raise ValueError(f"thoughts have {thoughts.shape[1]} tokens, more than max_thought_len={self.cfg.max_thought_len}")
            thoughts = F.pad(thoughts, (0, extra), value=vocab.PAD)
        valid = images.new_ones(images.shape[0], dtype=torch.bool) if fixed else None
        return self(images, [images.shape[0]], mission, state, thoughts, valid=valid)


def compile_or_warn(agent: Agent, mode: str | None, setting: str) -> bool:
    """``agent.compile_steps(mode)`` unless ``mode`` is None; where torch.compile cannot run,
    one line on stderr names ``setting`` and the cause, and the agent stays eager. True if compiled."""
    if mode is None:
        return False
    problem = agent.compile_steps(mode)
    if problem is not None:
        print(f"warning: {setting}: {mode}: torch.compile does not run here ({problem}); running eagerly",
              file=sys.stderr)
    return problem is None


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
