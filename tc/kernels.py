"""Speed kernels of the agent: the time-major layout helpers and taped matmuls.

The agent steps through time in Python: every recurrent weight (LSTM, the memory-keyed
projections) is used once per time step. Two things keep that fast:

- *time-major rows with a shrinking active set*: the episodes of a batch are sorted by
  length, longest first, so step t covers the first ``sizes[t]`` episodes and its rows are
  one contiguous slice (:func:`per_step`);
- *taped matmuls* (:class:`GradTape`): the gradient of a weight used at every step is
  summed in one matmul at the end of the backward pass instead of one full [out, in]
  matrix per step.

Everything here is exact: the same maths as ``nn.LSTMCell`` / ``nn.Linear``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def per_step(sizes: list[int], *tensors: Tensor | None) -> zip:
    """Iterate over the steps of time-major ``tensors``: yields (n, rows of each tensor); None
    for a tensor that is None.

    ``split`` rather than slicing: the backward of a slice writes a zero tensor as large
    as the whole input, per step; that of ``split`` concatenates the gradients once.
    """
    return zip(sizes, *(t.split(sizes) if t is not None else [None] * len(sizes) for t in tensors))


def first_rows(n: int, *tensors: Tensor) -> tuple[Tensor, ...]:
    """The first ``n`` rows of each tensor, the tensor itself when it has ``n`` rows: the backward
    of a slice zero-fills a tensor as large as its input and copies into it (two kernels on a
    GPU), even when the slice holds every row, as it does at most steps (and at all of a
    padded chunk's)."""
    return tuple(t if t.shape[0] == n else t[:n] for t in tensors)


class GradTape:
    """Sums the gradient of a weight (and bias) used at every step of a recurrence in one matmul.

    Autograd would build and add a full [out, in] gradient matrix at every step: for a
    2048-wide LSTM that is ~200 MB of memory traffic per step, which dominates CPU training
    time. The tape keeps each step's (input, output gradient) instead; the last of the
    steps' backward calls (``pending`` reaches 0) returns the whole sum, and the bias's (the
    output gradients' sum: one reduction, not one per step). Every taped step must reach
    the loss, or the weight would get no gradient. One tape per weight and forward pass.
    """

    def __init__(self):
        self.pending = 0
        self.inputs: list[Tensor] = []
        self.grads: list[Tensor] = []


class _TapedMatmul(torch.autograd.Function):
    # Under autocast the forward's matmul runs in the autocast dtype; the backward works in that
    # dtype explicitly (it does not rely on autocast being on there, which differs by device)
    # and hands autograd gradients in the dtypes of x, weight and bias.
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, tape: GradTape) -> Tensor:
        out = F.linear(x, weight, bias)  # the bias added inside the matmul (addmm)
        ctx.save_for_backward(x.to(out.dtype), weight)
        ctx.x_dtype, ctx.bias_dtype, ctx.tape = x.dtype, None if bias is None else bias.dtype, tape
        tape.pending += 1
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        grad, tape = grad.to(x.dtype), ctx.tape
        tape.inputs.append(x)
        tape.grads.append(grad)
        tape.pending -= 1
        grad_weight = grad_bias = None
        if tape.pending == 0:
            grads = torch.cat(tape.grads)
            grad_weight = grads.t().mm(torch.cat(tape.inputs)).to(weight.dtype)
            if ctx.bias_dtype is not None:
                grad_bias = grads.sum(0).to(ctx.bias_dtype)
            tape.inputs, tape.grads = [], []
        grad_x = grad.mm(weight.to(grad.dtype)).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        return grad_x, grad_weight, grad_bias, None


def autocast_once(t: Tensor | None) -> Tensor | None:
    """``t`` in the autocast dtype when autocast is on for its device, else ``t`` itself.

    A weight used at every step is cast here once per forward pass: autocast caches the
    casts of leaf tensors only, and ``weight.t()`` in a per-step matmul is none, so it would
    copy the whole weight to bfloat16 at every step (~64 MB for a 2048-wide LSTM).
    """
    if t is None or not torch.is_autocast_enabled(t.device.type):
        return t
    return t.to(torch.get_autocast_dtype(t.device.type))


def taped_linear(x: Tensor, weight: Tensor, tape: GradTape | None, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T (+ bias)``, the weight's and bias's gradients through ``tape`` when autograd records."""
    if tape is not None and torch.is_grad_enabled():
        return _TapedMatmul.apply(x, weight, bias, tape)
    return F.linear(x, weight, bias)


class TapedLinear:
    """``nn.Linear`` layers of the same input called once per time step, their weight gradient
    through one tape. Several layers run as one matmul, their outputs side by side: their
    weights are stacked once per forward pass (one kernel and one gradient on a GPU, not one
    per layer). ``tape=False``: autograd's own gradient per call (inside ``torch.compile``,
    which cannot trace a tape's backward)."""

    def __init__(self, *linears: nn.Linear, tape: bool = True):
        weight, bias = (torch.cat(ps) if len(ps) > 1 else ps[0] for ps in zip(*((m.weight, m.bias) for m in linears)))
        self.weight, self.bias, self.tape = autocast_once(weight), autocast_once(bias), GradTape() if tape else None

    def __call__(self, x: Tensor) -> Tensor:
        return taped_linear(x, self.weight, self.tape, self.bias)


# train.compile / evaluate.compile: null (eager) or one of torch.compile's modes (tc.model.Agent.compile_steps).
# Not "reduce-overhead": its CUDA graphs are recorded per input shape, and the active rows change
# at every step of every batch.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def compile_problem(device: torch.device | str, mode: str) -> str | None:
    """Why ``torch.compile(mode=mode)`` cannot run on ``device`` here (no C++ compiler, no
    Triton, an unsupported platform...), in one line; None when it can.

    torch.compile fails only when a compiled function is first called, possibly in the
    middle of training: this compiles and runs a tiny function with its backward first.
    """

    def probe(x: Tensor) -> Tensor:  # its own code object: no recompile counted against the agent's
        return torch.sigmoid(x) * x

    try:
        torch.compile(probe, dynamic=True, mode=mode)(torch.ones(2, 4, device=device, requires_grad=True)).sum().backward()
    except Exception as err:  # noqa: BLE001 -- whatever the cause, the agent then runs eagerly
        return one_line(err)
    return None


def one_line(err: Exception) -> str:
    """An exception as one line for a warning: its type and its message's first line."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def record(fns: list[Callable[[], dict[str, Tensor]]], device: torch.device, pool=None,
           warmup: int = 2) -> tuple[list[dict[str, Tensor]], list[Callable[[], None]], object]:  # fmt: skip
    """Record each of ``fns`` (fixed-shape computations returning dicts of tensors, run in this order)
    for replaying in this order, each as its own graph, so that eager work may run between them.

    On CUDA: ``warmup`` eager runs of them all on a side stream (cuBLAS / cuDNN workspaces,
    lazy set-ups), then a CUDA graph of each in memory ``pool``, shared by graphs never
    replayed at the same time; a later function may use what an earlier one left alive (an
    autograd graph to take the gradient of: a forward and a backward graph). A graph's
    outputs may lie where another graph of the pool keeps its temporaries: read them before
    the next replay. Elsewhere every replay runs its function eagerly, which is what tests on
    the CPU check of the callers. The functions run for real while recording: the caller
    undoes what they changed. Returns (per function the tensors every replay rewrites, the
    replays, the memory pool).
    """
    if device.type != "cuda":
        outputs = [fn() for fn in fns]

        def replay_of(fn: Callable[[], dict[str, Tensor]], out: dict[str, Tensor]) -> Callable[[], None]:
            def replay() -> None:
                for k, v in fn().items():
                    out[k].copy_(v)

            return replay

        return outputs, [replay_of(fn, out) for fn, out in zip(fns, outputs)], None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            for fn in fns:
                fn()
    torch.cuda.current_stream().wait_stream(side)
    outputs, replays = [], []
    for fn in fns:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs.append(fn())
        pool = graph.pool()
        replays.append(graph.replay)
    return outputs, replays, pool


def lstm_pointwise(x_gates: Tensor, h_gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """The LSTM cell's update from the input's and the memory's gate terms [n, 4m]; returns (h, c)."""
    i, f, g, o = (x_gates + h_gates).chunk(4, 1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


class TapedLSTMCell:
    """An ``nn.LSTMCell`` stepped through time: both weights' gradients through tapes.

    ``input_gates`` may be computed for many rows at once (inputs that do not depend on
    the recurrence) and fed to ``step``. ``pointwise``: :func:`lstm_pointwise` or a
    compiled version of it (tc.model.Agent.compile_steps).
    """

    def __init__(self, cell: nn.LSTMCell, pointwise: Callable = lstm_pointwise):
        self.weight_ih, self.weight_hh = autocast_once(cell.weight_ih), autocast_once(cell.weight_hh)
        self.bias = autocast_once(cell.bias_ih + cell.bias_hh)
        self.tape_ih, self.tape_hh = GradTape(), GradTape()
        self.pointwise = pointwise

    def input_gates(self, x: Tensor) -> Tensor:
        return taped_linear(x, self.weight_ih, self.tape_ih, self.bias)

    def step(self, x_gates: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """One step given the input's gate term; returns (h, c)."""
        return self.pointwise(x_gates, taped_linear(h, self.weight_hh, self.tape_hh), c)

    def __call__(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        return self.step(self.input_gates(x), h, c)
