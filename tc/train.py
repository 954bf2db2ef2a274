"""Imitation training of the TC agent (actions + thoughts) or the BC baseline (actions).

One update = one batch of whole episodes, cut into chunks of ``recurrence`` steps
(truncated BPTT: the memories are detached between chunks, gradients of all chunks are
accumulated, then one optimizer step, without clipping unless ``max_grad_norm``); the chunks
run one after another or, ``layout: chunks``, side by side (:func:`run_chunks_side_by_side`). Loss:

    action NLL - entropy_coef * entropy + sg_coef * thought NLL (teacher-forced decoder)

summed over the frames (the thought NLL over a thought's words too) and divided by the
frames of an average batch: every frame weighs the same whatever the batching
(:func:`loss_scale`). A batch is teacher-forced with probability ``tf_ratio(epoch)``
(drawn once per batch): the ground-truth thoughts fill the upper level's history and
drive the lower level; otherwise the upper level runs free, its own greedy thoughts
taking their place, as at test time. BatchNorm's running statistics are those of all
frames of an update (tc.model.BatchNorm2d).

Everything is deterministic for a given seed: the episode order and the teacher-forcing
coins are pure functions of (seed, epoch, batch). ``last.pt`` is rewritten every
``checkpoint_interval`` updates, at every epoch end and when the run is stopped (a
KeyboardInterrupt: Ctrl-C, or SIGTERM under tc.params.sigterm_unwinds) with the full resume
state (model, optimizer, RNGs, position, history); a killed run resumed from it ends with the
same weights, bit for bit on CPU, as an uninterrupted one.

Under a process group (torchrun, see tc.distributed) each of the N ranks takes the episodes
r, r + N, ... of every batch and the update is the one-process update of the whole batch;
rank 0 alone validates, writes checkpoints and calls ``log_fn``.
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from tc import distributed, vocab
from tc.checkpoint import check_config, load_checkpoint, save_checkpoint
from tc.demos import Demos
from tc.device import pick_device
from tc.kernels import COMPILE_MODES, one_line, record
from tc.model import (Agent, AgentOutput, BatchNorm2d, ModelConfig, batchnorm_uncounted, commit_batchnorm,
                      compile_or_warn, count_parameters)  # fmt: skip
from tc.params import check_fields, dataclass_from_dict, param, stops_deferred, stops_ignored

LogFn = Callable[[dict[str, float], int], None]
EvaluateFn = Callable[[Agent], dict]


@dataclass(frozen=True)
class TrainConfig:
    """The ``train:`` section of params.yaml (defaults: params.yaml's; ranges: tc.params.param)."""

    seed: int = param(1, ge=0)
    epochs: int = param(3, ge=1)
    episodes_per_epoch: int = param(500, ge=1)
    batch_size: int = param(32, ge=1)  # episodes per update
    sort_window: int = param(16, ge=1)  # batches whose episodes are grouped by length (1: no grouping)
    recurrence: int = param(20, ge=1)  # truncated BPTT length (steps)
    # How a batch's chunks run (run_batch): "episodes", one after another, each episode a row; "chunks",
    # side by side after a pass without gradients that carries the state to each chunk's start.
    layout: str = param("episodes", choices=("episodes", "chunks"))
    lr: float = param(5e-4, gt=0)
    adam_eps: float = param(1e-5, gt=0)
    warmup_epochs: float = param(1, ge=0)  # linear lr ramp over this many epochs (0: none)
    lr_halve_epoch: int | None = param(2, ge=0)  # lr halves from this epoch (0-based) on; None: never
    entropy_coef: float = param(0.01, ge=0)
    sg_coef: float = param(2.0, ge=0, thoughts=True)  # thought loss weight; 0 = "TC without imitating thoughts"
    stop_tf: int = param(1, ge=0, thoughts=True)  # teacher forcing ratio 1 for epochs < stop_tf, then linear to 0
    max_grad_norm: float | None = param(None, gt=0)  # gradient-norm clipping; None: none (paper)
    # The thought NLL summed over a thought's words (paper) or averaged per word.
    thought_loss: str = param("sum", choices=("sum", "mean"), thoughts=True)
    val_interval: int = param(1, ge=1)  # epochs between validations (the last epoch always validates)
    val_episodes: int = param(50, ge=0)  # success-rate episodes per validation (0: action accuracy only)
    checkpoint_interval: int = param(50, ge=1, speed=True)  # updates between resume checkpoints (plus every epoch end)
    device: str = param("auto", choices=("auto", "cpu", "cuda"), speed=True)
    threads: int = param(1, ge=0, speed=True)  # torch intra-op threads on CPU (0: torch's default); see params.yaml
    # bfloat16 autocast, on CUDA only: with cuda_graphs 1.70x fp32's frames/s, eagerly 0.84x (its casts are
    # more launches in a launch-bound loop); TC, paper size, batch 180, an H200 (benchmarks/results).
    amp: bool = param(False)
    # TensorFloat-32 matmuls on CUDA (fp32 storage, inputs rounded to a 10-bit mantissa, fp32
    # accumulation; cuDNN's convolutions use it by default); ignored on the CPU (use_tf32).
    tf32: bool = param(False)
    # torch.compile of the step loop's work between matmuls (Agent.compile_steps); same maths up to
    # float rounding, like the device, so a speed setting.
    compile: str | None = param(None, choices=COMPILE_MODES, speed=True)
    # Each training chunk (forward + backward) replayed from a CUDA graph, batches padded to fixed
    # shapes (ChunkGraphs); CUDA and one process only. The same maths up to float rounding.
    cuda_graphs: bool = param(False, speed=True)
    nproc: int = param(1, ge=1, speed=True)  # data-parallel processes (stages/train.py starts torchrun when > 1)

    def __post_init__(self):
        check_fields(self, "train")
        smallest = self.episodes_per_epoch % self.batch_size or self.batch_size  # an epoch's last batch
        if self.nproc > smallest:
            # Checked here, before torchrun starts N processes that would each fail with a traceback.
            raise ValueError(f"train.nproc = {self.nproc}: more processes than the {smallest} episodes of an epoch's "
                             f"smallest batch (train.episodes_per_epoch {self.episodes_per_epoch}, train.batch_size "
                             f"{self.batch_size}); each process takes a share of every batch")
        if self.layout == "chunks" and self.cuda_graphs:
            raise ValueError("train.layout = 'chunks' runs eagerly: train.cuda_graphs needs train.layout 'episodes'")

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return dataclass_from_dict(cls, d, "train")


# ----------------------------------------------------------------------------- schedules


def tf_ratio(epoch: int, stop_tf: int, epochs: int) -> float:
    """Teacher-forcing ratio of 0-based ``epoch``: 1 before ``stop_tf``, then linear to 0 at the last epoch."""
    if epoch < stop_tf or epochs <= stop_tf:
        return 1.0
    return (epochs - 1 - epoch) / (epochs - stop_tf)


def learning_rate(cfg: TrainConfig, epoch: int, batch: int, batches_per_epoch: int) -> float:
    """Learning rate of update ``batch`` of ``epoch``: linear warm-up ramp, halved from ``lr_halve_epoch``."""
    lr = cfg.lr
    if cfg.warmup_epochs > 0:
        lr *= min(1.0, (epoch + (batch + 1) / batches_per_epoch) / cfg.warmup_epochs)
    if cfg.lr_halve_epoch is not None and epoch >= cfg.lr_halve_epoch:
        lr *= 0.5
    return lr


def epoch_episodes(num_episodes: int, episodes_per_epoch: int, epoch: int, seed: int) -> np.ndarray:
    """Episode indices of ``epoch``: a window of an endless stream of seeded permutations (passes)."""
    first, last = epoch * episodes_per_epoch, (epoch + 1) * episodes_per_epoch
    passes = range(first // num_episodes, (last - 1) // num_episodes + 1)
    stream = np.concatenate([np.random.default_rng([seed, p]).permutation(num_episodes) for p in passes])
    start = first - passes[0] * num_episodes
    return stream[start : start + episodes_per_epoch].astype(np.int64)


def epoch_batches(lengths: np.ndarray, cfg: TrainConfig, epoch: int) -> list[np.ndarray]:
    """Episode indices of each batch of ``epoch``, in training order.

    A batch costs one recurrent step per step of its *longest* episode, whatever the
    others' lengths, and at paper size a step is bound by reading the 2048-wide LSTM
    weights. So each window of ``sort_window`` batches of the shuffled stream is sorted
    by episode length before being cut into batches (similar lengths together, 3.2x
    fewer steps at batch 180 on BossLevel); the batches are then shuffled.
    """
    episodes = epoch_episodes(len(lengths), cfg.episodes_per_epoch, epoch, cfg.seed)
    window = cfg.batch_size * cfg.sort_window
    batches = []
    for w in range(0, len(episodes), window):
        chunk = episodes[w : w + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i : i + cfg.batch_size] for i in range(0, len(chunk), cfg.batch_size)]
    order = np.random.default_rng([cfg.seed, epoch, 3]).permutation(len(batches))
    return [batches[i] for i in order]


def use_true_thoughts(seed: int, epoch: int, batch: int, ratio: float) -> bool:
    """The teacher-forcing coin of one batch (a pure function, so resuming replays it)."""
    return ratio >= 1.0 or np.random.default_rng([seed, epoch, batch, 7]).random() < ratio


# ----------------------------------------------------------------------------- batches


@dataclass
class Batch:
    """Episodes sorted longest first, steps laid out time-major (see tc.model)."""

    images: torch.Tensor  # uint8 [N, 7, 7, 3]
    actions: torch.Tensor  # long [N]
    thoughts: torch.Tensor  # long [N, L]
    missions: torch.Tensor  # long [B, M]
    sizes: list[int]  # active episodes per step
    starts: list[int]  # first row of each step, plus N at the end
    valid: torch.Tensor | None = None  # bool [N]: the real rows of a fixed-shape batch (Padding); None: all

    @property
    def frames(self) -> int:
        return self.starts[-1] if self.valid is None else int(self.valid.sum())

    def chunks(self, recurrence: int) -> Iterator[tuple[list[int], slice]]:
        """The truncated-BPTT chunks of ``recurrence`` steps: (active episodes per step, rows)."""
        for t0 in range(0, len(self.sizes), recurrence):
            t1 = min(t0 + recurrence, len(self.sizes))
            yield self.sizes[t0:t1], slice(self.starts[t0], self.starts[t1])


class Padding(NamedTuple):
    """The fixed shapes of the chunks of a padded batch (CUDA graphs: :class:`ChunkGraphs`).

    Every step holds ``episodes`` rows: the batch's episodes, an ended episode repeating its
    last frame, then (for a short batch) copies of its shortest episode. The steps are
    padded so that every chunk has ``recurrence`` steps but the last, which has a multiple
    of ``step_bucket`` (a pair of graphs per chunk length, a few steps of padding instead of up to a
    whole chunk's). Thoughts and missions are padded to ``thought_len`` and ``mission_len``
    words. The copies are real data, so nothing becomes NaN; ``Batch.valid`` marks the real
    rows, the only ones BatchNorm and the loss count.
    """

    episodes: int
    recurrence: int
    step_bucket: int
    thought_len: int
    mission_len: int

    @classmethod
    def of(cls, demos: Demos, cfg: TrainConfig) -> Padding:
        """The padding for training on ``demos`` with ``cfg``: its batch size, recurrence and longest words;
        last chunks of at most 5 lengths."""
        return cls(cfg.batch_size, cfg.recurrence, -(-cfg.recurrence // 5),
                   max(1, int((demos.thoughts != vocab.PAD).sum(1).max())), demos.missions.shape[1])

    def steps(self, steps: int) -> int:
        """The padded length of a batch of ``steps`` steps."""
        full, rest = divmod(steps, self.recurrence)
        return full * self.recurrence + min(self.recurrence, -(-rest // self.step_bucket) * self.step_bucket)


def make_batch(demos: Demos, episodes: np.ndarray, device: torch.device, steps: int = 0,
               padding: Padding | None = None) -> Batch:  # fmt: skip
    """Gather whole ``episodes`` into time-major tensors with one fancy index per array.

    With ``steps`` beyond the longest episode, the batch ends with empty steps (size 0):
    the ranks of a data-parallel batch step through the same number of steps. With
    ``padding``, a fixed-shape batch (see :class:`Padding`).
    """
    lengths = demos.offsets[episodes + 1] - demos.offsets[episodes]
    order = np.argsort(-lengths, kind="stable")
    episodes, lengths = episodes[order], lengths[order]
    t = np.arange(max(lengths[0], steps))[:, None]
    width = vocab.MAX_THOUGHT_LEN
    valid = None
    if padding is None:
        active = t < lengths[None, :]  # [T, B]; each row a prefix, since lengths are sorted
        idx = (demos.offsets[episodes][None, :] + t)[active]
        missions = demos.missions[episodes]
        missions = missions[:, : max(1, int((missions != vocab.PAD).sum(1).max()))]
        sizes = active.sum(1)
    else:
        if len(episodes) > padding.episodes:
            raise ValueError(f"a batch of {len(episodes)} episodes does not fit a padding of {padding.episodes}")
        fill = padding.episodes - len(episodes)
        t = np.arange(padding.steps(len(t)))[:, None]
        episodes, lengths = np.pad(episodes, (0, fill), mode="edge"), np.pad(lengths, (0, fill), mode="edge")
        active = (t < lengths[None, :]) & (np.arange(padding.episodes) < padding.episodes - fill)[None, :]
        idx = (demos.offsets[episodes][None, :] + np.minimum(t, lengths[None, :] - 1)).reshape(-1)
        valid = active.reshape(-1)
        missions = np.pad(demos.missions[episodes], ((0, 0), (0, padding.mission_len - demos.missions.shape[1])))
        width = padding.thought_len
        sizes = np.full(len(t), padding.episodes)
    to = lambda a, dtype: torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)  # noqa: E731
    return Batch(
        images=to(demos.images[idx], torch.uint8),
        actions=to(demos.actions[idx], torch.long),
        thoughts=to(demos.thoughts[idx, :width], torch.long),
        missions=to(missions, torch.long),
        sizes=sizes.tolist(),
        starts=np.concatenate([[0], np.cumsum(sizes)]).tolist(),
        valid=None if valid is None else to(valid, torch.bool),
    )


STAT_KEYS = ("frames", "action_nll", "entropy", "action_correct", "thought_tokens", "thought_nll", "thought_correct")


def loss_terms(out: AgentOutput, actions: torch.Tensor, thoughts: torch.Tensor,
               valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """Summed loss terms and counts of one forward pass (``STAT_KEYS``), as tensors.

    ``thoughts``: the true thoughts of the rows; their words' NLL is summed per thought
    (a thought's words are one prediction). BC has no thought terms (zeros), nor has a pass
    without ``thought_logits``. ``valid``: the rows that count, of a fixed-shape chunk
    (tc.model.Agent.forward): the action terms mask the others out, so that no shape depends
    on the data; the thoughts were decoded on these rows alone.
    """
    logp = out.logits.float().log_softmax(1)

    def total(x: torch.Tensor) -> torch.Tensor:  # summed over the rows that count ([N, ...])
        return x.sum() if valid is None else (x * valid.view(-1, *(1,) * (x.dim() - 1))).sum()

    terms = {
        "frames": logp.new_tensor(float(actions.shape[0])) if valid is None else valid.sum().float(),
        "action_nll": -total(logp.gather(1, actions[:, None])),
        "entropy": -total(logp.exp() * logp),
        "action_correct": total(logp.argmax(1) == actions),
    }
    zero = terms["action_nll"].new_zeros(())
    terms.update(thought_tokens=zero, thought_nll=zero, thought_correct=zero)
    if out.thought_logits is not None:
        terms.update(thought_terms(out.thought_logits, thoughts if valid is None else thoughts[valid]))
    return terms


def thought_terms(thought_logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """The thought terms of ``STAT_KEYS`` from teacher-forced ``thought_logits`` [K, vocab] of the K
    words (and <eos>) of ``targets`` [n, L], in the order of ``targets[targets != PAD]``."""
    words = targets[targets != vocab.PAD]
    logits = thought_logits.float()
    return {"thought_tokens": logits.new_tensor(float(words.numel())),
            "thought_nll": F.cross_entropy(logits, words, reduction="sum"),
            "thought_correct": (logits.argmax(1) == words).sum()}  # fmt: skip


def objective(terms: dict, cfg: TrainConfig, scale: tuple[float, float]):
    """The training loss from summed ``terms`` (tensors or floats), ``scale`` = (frames, words) normalisers.

    action NLL - entropy_coef * entropy, per frame, + sg_coef * thought NLL, per frame
    (``thought_loss: sum``: summed over a thought's words, the paper) or per word (``mean``).
    """
    frames, words = scale
    thought = terms["thought_nll"] / (frames if cfg.thought_loss == "sum" else max(words, 1))
    return (terms["action_nll"] - cfg.entropy_coef * terms["entropy"]) / frames + cfg.sg_coef * thought


def loss_scale(demos: Demos, cfg: TrainConfig) -> tuple[float, float]:
    """The (frames, thought words) of an average batch: the loss normalisers of every batch.

    Constants, not the batch's own counts: batches grouped by length (``sort_window``) hold
    more frames when their episodes are long, and dividing by their own count would give
    each frame of a long episode less weight. Every frame weighs the same, on every rank.
    """
    per_episode = demos.num_steps / demos.num_episodes
    words = float((demos.thoughts != vocab.PAD).sum()) / demos.num_episodes
    return cfg.batch_size * per_episode, cfg.batch_size * words


def run_batch(
    agent: Agent,
    batch: Batch,
    cfg: TrainConfig,
    true_thoughts: bool,
    amp: bool,
    scale: tuple[float, float] | None = None,
) -> dict[str, float]:
    """Forward one batch chunk by chunk (truncated BPTT); returns the summed ``loss_terms``.

    With ``scale`` (training) each chunk's :func:`objective` is back-propagated, gradients
    accumulating over the chunks. ``true_thoughts``: the teacher-forcing coin; without it
    the upper level runs free (its own greedy thoughts fill its history and drive the lower
    level), as at test time. The thought loss is always that of the true thoughts.
    """
    if cfg.layout == "chunks" and scale is not None:  # without gradients (validation) side by side saves nothing
        return run_chunks_side_by_side(agent, batch, cfg, true_thoughts, amp, scale)
    state = agent.initial_state(batch.sizes[0], batch.images.device)
    sums = dict.fromkeys(STAT_KEYS, 0.0)
    for sizes, rows in batch.chunks(cfg.recurrence):
        terms, out = chunk_terms(agent, batch.images[rows], sizes, batch.missions, state,
                                 batch.actions[rows], batch.thoughts[rows],
                                 None if batch.valid is None else batch.valid[rows], true_thoughts, amp)  # fmt: skip
        if scale is not None:
            objective(terms, cfg, scale).backward()
        values = torch.stack([terms[k].detach().float() for k in STAT_KEYS]).tolist()  # one device sync
        sums = {k: sums[k] + v for k, v in zip(STAT_KEYS, values)}
        state = {k: v.detach() for k, v in out.state.items()}
    return sums


def run_chunks_side_by_side(agent: Agent, batch: Batch, cfg: TrainConfig, true_thoughts: bool, amp: bool,
                            scale: tuple[float, float]) -> dict[str, float]:  # fmt: skip
    """:func:`run_batch` with the batch's chunks side by side (``train.layout: chunks``), in training.

    A pass without gradients steps through the batch to get the state at the start of each
    chunk (episode e's chunk k: its steps kR .. kR + R - 1); then every chunk of every
    episode is a row of one pass of at most R steps with gradients, from that state. The
    same chunks, states and losses as chunks in sequence, so in eval mode the same
    gradients (tests); in training, BatchNorm's calls in the pass with gradients see all
    phases of the episodes at a step (as the public code's layout does) and dropout draws differ. The point is the
    number of steps: on a GPU bound by launching kernels, R forward + backward steps (plus
    the cheaper pass without gradients) instead of one per step of the longest episode.
    The pass without gradients adds nothing to BatchNorm's statistics: each frame counts once.
    Its own BatchNorm calls see one time step of the episodes, as in sequence: the state a
    chunk starts from is normalised as there. Not for padded batches (CUDA graphs).
    """
    if batch.valid is not None:
        raise ValueError("a padded batch (CUDA graphs) runs its chunks in sequence, not side by side")
    R, device = cfg.recurrence, batch.images.device
    chunks = list(batch.chunks(R))
    pad = len(chunks) * R - len(batch.sizes)  # steps after the batch's last, to fill its last chunk
    per_chunk = np.pad(batch.sizes, (0, pad)).reshape(len(chunks), R)  # rows per step
    states = [agent.initial_state(batch.sizes[0], device)]
    with torch.no_grad(), batchnorm_uncounted(agent):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            mission = agent.encode_mission(batch.missions)
            for sizes, rows in chunks[:-1]:
                out = agent(batch.images[rows], sizes, mission, states[-1],
                            thoughts=batch.thoughts[rows] if true_thoughts else None)  # fmt: skip
                states.append(out.state)
    # Row (k, j): episode j's chunk k, for the episodes under way at the chunk's start, longest rows first.
    chunk_of = np.repeat(np.arange(len(chunks)), per_chunk[:, 0])
    episode = np.concatenate([np.arange(n) for n in per_chunk[:, 0]])
    lengths = (per_chunk[chunk_of] > episode[:, None]).sum(1)
    order = np.argsort(-lengths, kind="stable")
    chunk_of, episode, lengths = chunk_of[order], episode[order], lengths[order]
    # Steps = min(R, steps of the batch), not the longest row: the ranks of a data-parallel batch
    # step alike (their batches have the same number of steps, tc.train.make_batch).
    t = np.arange(min(R, len(batch.sizes)))[:, None]
    active = t < lengths[None, :]
    first_row = np.pad(batch.starts[:-1], (0, pad))  # row of a step's first episode
    index = torch.from_numpy((first_row[chunk_of * R + t] + episode)[active]).to(device)
    state = {k: torch.cat([s[k][:n] for s, n in zip(states, per_chunk[:, 0])])[torch.from_numpy(order).to(device)]
             for k in states[0]}  # fmt: skip
    terms, _ = chunk_terms(agent, batch.images[index], active.sum(1).tolist(),
                           batch.missions[torch.from_numpy(episode).to(device)], state, batch.actions[index],
                           batch.thoughts[index], None, true_thoughts, amp)  # fmt: skip
    objective(terms, cfg, scale).backward()
    return dict(zip(STAT_KEYS, torch.stack([terms[k].detach().float() for k in STAT_KEYS]).tolist()))


def chunk_terms(
    agent: Agent, images: torch.Tensor, sizes: list[int], missions: torch.Tensor, state: dict[str, torch.Tensor],
    actions: torch.Tensor, thoughts: torch.Tensor, valid: torch.Tensor | None, true_thoughts: bool, amp: bool,
    decode: bool = True,
) -> tuple[dict[str, torch.Tensor], AgentOutput]:
    """The forward pass of one chunk of a batch from ``state``: its ``loss_terms`` and the agent's output.
    ``decode`` False: without the teacher-forced thought decoder (thought terms zero; :class:`ChunkGraphs`)."""
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        # Re-encoded per chunk (B missions, cheap): each chunk's graph is freed by its backward.
        mission = agent.encode_mission(missions, fixed=valid is not None)
        out = agent(images, sizes, mission, state, thoughts=thoughts if true_thoughts else None,
                    targets=thoughts if agent.upper is not None and decode else None, valid=valid)
    return loss_terms(out, actions, thoughts, valid), out


class ChunkGraphs:
    """Training chunks replayed from CUDA graphs (``train.cuda_graphs``): ``run_batch`` with two launches a chunk.

    On a GPU the step loop is bound by launching kernels (an H100 profile of a paper-size
    update: ~280 launches per time step, the GPU busy 14% of the time). A CUDA graph records
    a chunk's kernels once and replays them. That needs fixed shapes and no host
    synchronisation: batches are padded (:class:`Padding`; the same losses and gradients as
    the shrinking layout, tests) so that a chunk is [steps x batch_size] rows, with
    ``recurrence`` steps or, for a batch's last chunk, a few more lengths. A forward and a
    backward graph per teacher-forcing mode and chunk length, all in one memory pool.

    Between the two, TC's teacher-forced thought decoder runs eagerly on the chunk's real
    rows at their own sizes (:meth:`decode`: a few hundred launches a chunk, not a step): in
    the graph it would decode every position of every padded row, ~2.4x its work per real
    frame on BossLevel and half of a padded row's FLOPs (benchmarks/step_kernels.py). It adds
    its weights' gradients and hands the backward graph the gradient of the memory (h, c)
    it started from.

    A replay reads the chunk copied into the graphs' input tensors and the state, copied into
    the graphs' state tensors from the previous chunk's (zeros at a batch's start); the
    backward adds the gradients (``torch.autograd.grad``) into the parameters' ``.grad``,
    writes the new state; the forward writes the loss terms and the BatchNorm sums. The
    graphs read the parameters where they are, and Adam updates them in place. Where
    capturing fails, one warning line, and every batch runs eagerly (the padded batch as it is).
    """

    def __init__(self, agent: Agent, cfg: TrainConfig, scale: tuple[float, float], amp: bool):
        self.agent, self.cfg, self.scale, self.amp = agent, cfg, scale, amp
        self.params = [p for p in agent.parameters() if p.requires_grad]
        # The decoder's own weights reach the loss through the eager decoding alone; the word
        # embedding, which gives the decoder its input gates, through both.
        decoder = [] if agent.upper is None else [*agent.upper.decoder.parameters(), *agent.upper.decoder_out.parameters()]
        self.body = [p for p in self.params if all(p is not q for q in decoder)]
        self.head = decoder + ([agent.perception.word_embedding.weight] if decoder else [])
        # (teacher-forced or BC, chunk steps) -> (inputs, state, memory gradient, outputs, forward, backward)
        self.graphs: dict[tuple[bool, int], tuple] = {}
        self.pool = None
        self.problem: str | None = None  # why capturing failed: then eager
        self.live: tuple | None = None  # the last forward's loss terms and output, for its backward

    def zero_grad(self) -> None:
        """Zero the gradients in place: the graphs add into these tensors."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            else:
                p.grad.zero_()

    def forward(self, inputs: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                true_thoughts: bool) -> dict[str, torch.Tensor]:  # fmt: skip
        """A chunk's forward pass without the teacher-forced decoder, as the forward graph records it:
        the loss terms (``STAT_KEYS``, the thought terms zero) as one tensor and the upper level's
        memory of every row ("h", "c"; TC)."""
        episodes = inputs["missions"].shape[0]
        terms, out = chunk_terms(self.agent, inputs["images"], [episodes] * (inputs["valid"].shape[0] // episodes),
                                 inputs["missions"], state, inputs["actions"], inputs["thoughts"], inputs["valid"],
                                 true_thoughts, self.amp, decode=False)  # fmt: skip
        self.live = terms, out
        memory = {} if out.memory is None else {"h": out.memory[0].detach(), "c": out.memory[1].detach()}
        return {"terms": torch.stack([terms[k].detach().float() for k in STAT_KEYS]), **memory}

    def decode(self, inputs: dict[str, torch.Tensor], memory: dict[str, torch.Tensor],
               grad_memory: dict[str, torch.Tensor]) -> dict[str, float]:  # fmt: skip
        """TC's teacher-forced thought decoder on the chunk's real rows, eagerly: adds the gradients of
        its weights, writes that of ``memory`` into ``grad_memory`` (zero for the padding) and returns
        its loss terms."""
        h, c = (memory[k].detach().requires_grad_() for k in "hc")
        with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.agent.decode_thoughts(h, c, inputs["thoughts"], inputs["valid"])
        terms = thought_terms(logits, inputs["thoughts"][inputs["valid"]])
        loss = objective({"action_nll": 0.0, "entropy": 0.0, **terms}, self.cfg, self.scale)
        grad_h, grad_c, *grads = torch.autograd.grad(loss, [h, c, *self.head])
        torch._foreach_add_([p.grad for p in self.head], grads)
        grad_memory["h"].copy_(grad_h)
        grad_memory["c"].copy_(grad_c)
        return dict(zip(terms, torch.stack([v.float() for v in terms.values()]).tolist()))

    def backward(self, state: dict[str, torch.Tensor], grad_memory: dict[str, torch.Tensor]) -> dict:
        """The backward pass of the last :meth:`forward`, as the backward graph records it: the gradients
        of its loss terms and of the memory's ``grad_memory`` added into the parameters', the new state
        written into ``state``."""
        terms, out = self.live
        self.live = None
        outputs, grad_outputs = [objective(terms, self.cfg, self.scale)], [None]
        if out.memory is not None:
            outputs += out.memory
            grad_outputs += [grad_memory["h"], grad_memory["c"]]
        # Raises where a parameter does not reach the loss: eager training would leave it alone.
        grads = torch.autograd.grad(outputs, self.body, grad_outputs)
        torch._foreach_add_([p.grad for p in self.body], grads)
        for k, v in out.state.items():  # after the backward, which may read the old state
            state[k].copy_(v.detach())
        return {}

    def _capture(self, inputs: dict[str, torch.Tensor], true_thoughts: bool) -> tuple:
        """(state, memory gradient, outputs, forward replay, backward replay) of a chunk recorded with
        ``inputs`` (tc.kernels.record; off CUDA each replay runs eagerly, what the tests on the CPU
        check). The runs while recording add to the gradients and BatchNorm sums: they are put
        back as they were (a capture may come in the middle of a batch)."""
        device = inputs["images"].device
        state = self.agent.initial_state(inputs["missions"].shape[0], device)
        rows = inputs["valid"].shape[0]  # outside the graphs' pool: the decoding writes it between the graphs
        grad_memory = {} if self.agent.upper is None else {k: state["up_h"].new_zeros(rows, state["up_h"].shape[1])
                                                          for k in "hc"}  # fmt: skip
        accumulated = self._accumulated()
        kept = [t.clone() for t in accumulated]
        try:
            (outputs, _), (forward, backward), self.pool = record(
                [lambda: self.forward(inputs, state, true_thoughts), lambda: self.backward(state, grad_memory)],
                device, self.pool)  # fmt: skip
        finally:
            self.live = None
            for t, k in zip(accumulated, kept):
                t.copy_(k)
        return state, grad_memory, outputs, forward, backward

    def _accumulated(self) -> list[torch.Tensor]:
        """What chunks add to over an update: the gradients and the BatchNorm sums."""
        return [p.grad for p in self.params] + [m.update_sums for m in self.agent.modules() if isinstance(m, BatchNorm2d)]

    def run_batch(self, batch: Batch, true_thoughts: bool) -> dict[str, float]:
        """:func:`run_batch` of a padded training ``batch`` (after :meth:`zero_grad`), from the graphs."""
        if self.problem is not None:
            return run_batch(self.agent, batch, self.cfg, true_thoughts, self.amp, self.scale)
        sums = dict.fromkeys(STAT_KEYS, 0.0)
        previous = None  # the state tensors of the previous chunk's graphs
        for sizes, part in batch.chunks(self.cfg.recurrence):
            key = (true_thoughts or self.agent.upper is None, len(sizes))  # BC reads no thoughts
            chunk = {"images": batch.images[part], "actions": batch.actions[part], "thoughts": batch.thoughts[part],
                     "valid": batch.valid[part], "missions": batch.missions}  # fmt: skip
            if key not in self.graphs:
                inputs = {k: v.clone() for k, v in chunk.items()}
                try:
                    self.graphs[key] = (inputs, *self._capture(inputs, true_thoughts))
                except Exception as err:  # noqa: BLE001 -- whatever the cause, training goes on eagerly
                    self.problem = one_line(err)
                    print(f"warning: train.cuda_graphs: capturing a chunk failed ({self.problem}); training eagerly",
                          file=sys.stderr)
                    for t in self._accumulated():  # this batch again, from its start
                        t.zero_()
                    for m in self.agent.modules():  # and without the statistics of the failed forward pass
                        if isinstance(m, BatchNorm2d):
                            m.pending.clear()
                    return run_batch(self.agent, batch, self.cfg, true_thoughts, self.amp, self.scale)
            inputs, state, grad_memory, outputs, forward, backward = self.graphs[key]
            for k, v in chunk.items():
                inputs[k].copy_(v)
            for k, v in state.items():
                if previous is None:
                    v.zero_()
                elif previous is not state:
                    v.copy_(previous[k])
            forward()
            # Read before the next replay (tc.kernels.record): the terms (one sync), the memory by the decoding.
            terms = dict(zip(STAT_KEYS, outputs["terms"].tolist()))
            if grad_memory:
                terms.update(self.decode(inputs, outputs, grad_memory))
            backward()
            previous = state
            sums = {k: sums[k] + terms[k] for k in STAT_KEYS}
        return sums


def train_update(
    agent: Agent,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    cfg: TrainConfig,
    true_thoughts: bool,
    amp: bool,
    scale: tuple[float, float],
    graphs: ChunkGraphs | None = None,
    step: bool = True,
) -> dict[str, float]:
    """One optimizer step on ``batch`` (gradients of all its chunks); returns its statistics.

    Under a process group, ``batch`` is this rank's part: gradients, BatchNorm statistics
    and the returned statistics are summed over the ranks before the step. With ``graphs``
    (a padded ``batch``), the chunks are replayed from CUDA graphs. ``step`` False: the
    gradients alone, in the parameters' ``.grad``, the BatchNorm statistics pending, nothing
    a checkpoint holds changed; :func:`apply_gradients` takes the step.
    """
    if graphs is None:
        optimizer.zero_grad(set_to_none=True)
        sums = run_batch(agent, batch, cfg, true_thoughts, amp, scale)
    else:
        graphs.zero_grad()
        sums = graphs.run_batch(batch, true_thoughts)
    if distributed.rank_and_world()[1] > 1:
        distributed.all_reduce_grads(agent.parameters())
        sums = distributed.all_reduce_sums(sums, batch.images.device)
    if step:
        apply_gradients(agent, optimizer, cfg)
    return sums


def apply_gradients(agent: Agent, optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
    """The step after :func:`train_update` with ``step`` False: the BatchNorm statistics and the optimizer's."""
    commit_batchnorm(agent)
    if cfg.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(agent.parameters(), cfg.max_grad_norm)
    optimizer.step()


def summarize_stats(sums: dict[str, float], cfg: TrainConfig, prefix: str = "") -> dict[str, float | None]:
    """Per-frame / per-word means of ``run_batch`` sums and the loss they make; thought metrics are None for BC."""
    frames, words = max(sums["frames"], 1), sums["thought_tokens"]
    out = {
        "action_nll": sums["action_nll"] / frames,
        "entropy": sums["entropy"] / frames,
        "action_acc": sums["action_correct"] / frames,
        "thought_nll": sums["thought_nll"] / words if words else None,
        "thought_acc": sums["thought_correct"] / words if words else None,
        "loss": objective(sums, cfg, (frames, words)),
    }
    return {prefix + k: v for k, v in out.items()}


@torch.no_grad()
def validate(agent: Agent, demos: Demos, cfg: TrainConfig, device: torch.device, amp: bool) -> dict:
    """Action accuracy (lower level on *generated* thoughts, as at test time) and thought token accuracy.

    For TC also ``val_oracle_action_acc``: the lower level fed the demos' own (the bot's)
    thoughts. Next to ``val_action_acc`` it says where the errors come from: well above it,
    from the thoughts; equal, the lower level does not act on its thoughts (yet).
    """
    agent.eval()
    # Keyed by the teacher-forcing flag of run_batch: False = own thoughts, True = the demos'.
    sums = {given: dict.fromkeys(STAT_KEYS, 0.0) for given in ((False, True) if agent.upper is not None else (False,))}
    all_eps = np.arange(demos.num_episodes)
    for i in range(0, len(all_eps), cfg.batch_size):
        batch = make_batch(demos, all_eps[i : i + cfg.batch_size], device)
        for given, total in sums.items():
            stats = run_batch(agent, batch, cfg, given, amp)
            sums[given] = {k: total[k] + stats[k] for k in STAT_KEYS}
    agent.train()
    row = summarize_stats(sums[False], cfg, "val_")
    if True in sums:
        row["val_oracle_action_acc"] = summarize_stats(sums[True], cfg)["action_acc"]
    return row


# ----------------------------------------------------------------------------- resume state


def rng_state() -> dict:
    """torch / numpy / python global RNG states as checkpoint-safe values."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def data_signature(demos: Demos) -> dict:
    return {"episodes": int(demos.num_episodes), "steps": int(demos.num_steps), "level": str(demos.manifest.get("level"))}


def check_resume(path: Path, ts: dict, cfg: TrainConfig, demos: Demos) -> None:
    """A resume checkpoint must come from the same training config and data (device may differ)."""
    # A setting added since the checkpoint was made has its default there: what that code did.
    saved = {f.name: f.default for f in fields(TrainConfig)} | dict(ts["train_config"])
    now = asdict(cfg)
    free = {f.name for f in fields(TrainConfig) if f.metadata["speed"]}  # they do not change what is learned
    diff = [f"{k}: checkpoint {saved[k]!r} vs now {v!r}" for k, v in now.items() if k not in free and saved[k] != v]
    if ts["data"] != data_signature(demos):
        diff.append(f"training data: checkpoint {ts['data']} vs now {data_signature(demos)}")
    if diff:
        raise ValueError(f"cannot resume from {path}: it was made with different settings ({'; '.join(diff)}); "
                         f"delete it to start afresh")


# ----------------------------------------------------------------------------- training loop


def use_tf32(cfg: TrainConfig, device: torch.device) -> None:
    """``train.tf32`` for training on ``device``: process-wide, like the thread count, and set either
    way, so that runs in one process do not leak into each other."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32


def resume_note(last_path: Path, saved: int | None, updates: int, cfg: TrainConfig) -> str:
    """Where a stopped run continues: what ``last_path`` holds (``saved`` updates, None: nothing yet)
    against the ``updates`` done."""
    total = cfg.epochs * -(-cfg.episodes_per_epoch // cfg.batch_size)
    if saved is None:
        return (f"this run has saved nothing yet ({last_path.name} is written every {cfg.checkpoint_interval} "
                f"updates and at every epoch's end), so the same command starts afresh")
    lost = f", the {updates - saved} update(s) after it are lost" if updates > saved else ""
    return f"the same command resumes from {last_path} at update {saved} of {total}{lost}"


def train(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    train_demos: Demos,
    val_demos: Demos,
    out_dir: str | Path,
    *,
    evaluate_fn: EvaluateFn | None = None,
    log_fn: LogFn | None = None,
    resume: bool = True,
    stop_after_updates: int | None = None,
    progress: bool = True,
) -> dict:
    """Train an agent; write ``out_dir``/last.pt (resume state) and best.pt; return a summary.

    ``evaluate_fn(agent) -> tc.evaluate.summarize(...)`` measures the success rate (with
    its interval and episode count) at each validation (skipped when None). ``log_fn(metrics, step)`` receives the metrics of
    every epoch with step = frames seen. With ``resume``, an existing last.pt of the same
    settings is continued. ``stop_after_updates`` ends this call after that many updates
    *without* saving, as if the process had been killed (tests of resuming).
    The summary holds the agent, the per-epoch ``history``, ``best`` and ``finished``.

    Under a process group of N ranks (all calling this with the same arguments), the ranks
    share every batch; ``out_dir`` must be the same folder for all (resuming reads its
    last.pt on every rank). Rank 0 alone validates (the others wait), writes the
    checkpoints and calls ``log_fn``; the other ranks' history has no validation metrics.
    """
    out_dir = Path(out_dir)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    rank, world = distributed.rank_and_world()
    device = pick_device(cfg.device, cfg.threads, key="train.device")
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())  # the rank's GPU, set by the caller
    amp = cfg.amp and device.type == "cuda"
    use_tf32(cfg, device)
    if train_demos.num_episodes == 0:
        raise ValueError("the training dataset has no episodes")

    torch.manual_seed(cfg.seed)
    agent = Agent(model_cfg).to(device)
    if world > 1:
        distributed.sync_batchnorm(agent)  # batch statistics of the whole batch, as with one process
    if world == 1:
        compile_or_warn(agent, cfg.compile, "train.compile")
    elif cfg.compile is not None and rank == 0:
        # The synchronised BatchNorm's all-reduce splits the compiled graphs, and inductor then
        # fails on the convolutions' backward (a stride assertion; torch 2.13, CPU): not compiled.
        print(f"warning: train.compile: {cfg.compile}: not with {world} processes (a torch.compile failure "
              f"with the synchronised BatchNorm); running eagerly", file=sys.stderr)
    optimizer = torch.optim.Adam(agent.parameters(), lr=cfg.lr, eps=cfg.adam_eps)
    scale = loss_scale(train_demos, cfg)
    graphs = padding = None
    if cfg.cuda_graphs and (device.type != "cuda" or world > 1):
        if rank == 0:
            print(f"warning: train.cuda_graphs: needs one process on a CUDA device (here: {world} on {device.type}); "
                  f"training eagerly", file=sys.stderr)
    elif cfg.cuda_graphs:
        graphs, padding = ChunkGraphs(agent, cfg, scale, amp), Padding.of(train_demos, cfg)
    # Training position and everything needed to continue it (saved in last.pt).
    ts = {"epoch": 0, "batch": 0, "updates": 0, "frames": 0, "wall_time_s": 0.0, "history": [],
          "epoch_sums": dict.fromkeys(STAT_KEYS, 0.0), "best_key": [-math.inf, -math.inf], "best": None}
    if resume and last_path.exists():
        ckpt = load_checkpoint(last_path, map_location="cpu")
        check_config(last_path, ckpt, model_cfg)
        check_resume(last_path, ckpt["train_state"], cfg, train_demos)
        agent.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["train_state"]["optimizer"])
        set_rng_state(ckpt["train_state"]["rng"])
        ts = {k: ckpt["train_state"][k] for k in ts}
    if world > 1:
        distributed.check_same(ts["updates"], f"the resume position (updates done) in {last_path}", device)

    saved = ts["updates"] if resume and last_path.exists() else None  # the updates last.pt holds

    def save_last(rng: dict | None = None) -> None:
        nonlocal saved
        if rank != 0:
            return
        state = dict(ts, optimizer=optimizer.state_dict(), rng=rng or rng_state(), train_config=asdict(cfg),
                     data=data_signature(train_demos))
        save_checkpoint(last_path, agent, train_state=state)
        saved = ts["updates"]

    lengths = np.diff(train_demos.offsets)
    updates_here = 0
    started = time.perf_counter() - ts["wall_time_s"]
    agent.train()
    batches_per_epoch = 0
    update_rng = None  # the RNG states before the update or validation under way: what a stop saves
    try:
        while ts["epoch"] < cfg.epochs:
            epoch = ts["epoch"]
            batches = epoch_batches(lengths, cfg, epoch)
            batches_per_epoch = len(batches)
            if world > 1 and min(map(len, batches)) < world:
                raise ValueError(f"epoch {epoch + 1} has a batch of {min(map(len, batches))} episodes, fewer than the "
                                 f"{world} processes; use a train.batch_size and episodes_per_epoch giving >= {world} per batch")
            ratio = tf_ratio(epoch, cfg.stop_tf, cfg.epochs)
            bar = tqdm(total=batches_per_epoch, initial=ts["batch"], desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       unit="batch", disable=not progress or rank != 0)
            while ts["batch"] < batches_per_epoch:
                update_rng = rng_state()
                b = ts["batch"]
                lr = learning_rate(cfg, epoch, b, batches_per_epoch)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                coin = use_true_thoughts(cfg.seed, epoch, b, ratio)
                if world == 1:
                    batch = make_batch(train_demos, batches[b], device, padding=padding)
                else:
                    # The batch is sorted by length, so every r-th episode gives the ranks similar shares.
                    episodes = batches[b]
                    batch = make_batch(train_demos, episodes[rank::world], device, steps=int(lengths[episodes].max()))
                sums = train_update(agent, optimizer, batch, cfg, coin, amp, scale, graphs, step=False)
                with stops_deferred():  # the step and its count land together: a stop sees both or neither
                    apply_gradients(agent, optimizer, cfg)
                    ts["epoch_sums"] = {k: ts["epoch_sums"][k] + sums[k] for k in STAT_KEYS}
                    ts["batch"] += 1
                    ts["updates"] += 1
                    ts["frames"] += int(sums["frames"])
                    ts["wall_time_s"] = time.perf_counter() - started
                    update_rng = None
                updates_here += 1
                bar.update(1)
                bar.set_postfix(loss=f"{summarize_stats(sums, cfg)['loss']:.3f}", lr=f"{lr:.2e}")
                if stop_after_updates is not None and updates_here >= stop_after_updates:
                    bar.close()
                    return {"agent": agent, "history": ts["history"], "best": ts["best"], "finished": False,
                            "frames": ts["frames"], "updates": ts["updates"]}
                if ts["updates"] % cfg.checkpoint_interval == 0 and ts["batch"] < batches_per_epoch:
                    save_last()
            bar.close()

            update_rng = rng_state()  # the validation's draws, if any, are undone by a stop too
            # The last update's rate (a run stopped during the validation resumes here, after the loop).
            lr = learning_rate(cfg, epoch, batches_per_epoch - 1, batches_per_epoch)
            row = {"epoch": epoch + 1, "updates": ts["updates"], "frames": ts["frames"], "lr": lr, "tf_ratio": ratio,
                   **summarize_stats(ts["epoch_sums"], cfg, "train_")}
            best = None
            if ((epoch + 1) % cfg.val_interval == 0 or epoch + 1 == cfg.epochs) and rank == 0:
                row.update(validate(agent, val_demos, cfg, device, amp))
                row["val_success"] = None
                if evaluate_fn:
                    s = evaluate_fn(agent)
                    row.update(val_success=float(s["success_rate"]), val_success_ci_low=s["success_ci_low"],
                               val_success_ci_high=s["success_ci_high"], val_episodes=s["episodes"])  # fmt: skip
                agent.train()
                key = [row["val_success"] if row["val_success"] is not None else -math.inf, row["val_action_acc"]]
                if key > ts["best_key"]:
                    best = key, {k: row.get(k) for k in ("epoch", "frames", "val_success", "val_success_ci_low",
                                                         "val_success_ci_high", "val_episodes", "val_action_acc",
                                                         "val_thought_acc")}  # fmt: skip
                    save_checkpoint(best_path, agent, meta={"best": best[1], "train_config": asdict(cfg)})
            ts["wall_time_s"] = time.perf_counter() - started
            row["wall_time_s"] = ts["wall_time_s"]
            # The epoch's record and the next epoch's start land together: a stop sees all or none
            # (stopped before, the resumed run validates again, and writes the same best.pt again).
            with stops_deferred():
                if best is not None:
                    ts["best_key"], ts["best"] = best
                ts["history"].append(row)
                ts["epoch"], ts["batch"] = epoch + 1, 0
                ts["epoch_sums"] = dict.fromkeys(STAT_KEYS, 0.0)
                update_rng = None
            save_last()
            if world > 1:
                dist.barrier()  # the other ranks wait for rank 0's validation and checkpoint
            if log_fn is not None and rank == 0:
                log_fn({k: float(v) for k, v in row.items() if v is not None}, ts["frames"])
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: saved on the way out (once the loop has begun)
        if rank == 0:
            with stops_ignored():  # a second Ctrl-C, or the launcher's SIGTERM after a scheduler's
                if batches_per_epoch > 0:
                    try:
                        save_last(update_rng)  # an update under way is undone: its RNG draws too
                    except Exception as problem:  # noqa: BLE001 -- a full disk: the note says what is kept
                        err.add_note(f"saving {last_path} failed ({one_line(problem)})")
                err.add_note(resume_note(last_path, saved, ts["updates"], cfg))  # tc.params.user_errors says it
        raise
    return {"agent": agent, "history": ts["history"], "best": ts["best"], "finished": True, "frames": ts["frames"],
            "updates": ts["updates"], "wall_time_s": ts["wall_time_s"], "parameters": count_parameters(agent)}
