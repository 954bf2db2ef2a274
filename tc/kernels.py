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

import torch
from torch import Tensor, nn


def per_step(sizes: list[int], *tensors: Tensor) -> zip:
    """Iterate over the steps of time-major ``tensors``: yields (n, rows of each tensor).

    ``split`` rather than slicing: the backward of a slice writes a zero tensor as large
    as the whole input, per step; that of ``split`` concatenates the gradients once.
    """
    return zip(sizes, *(t.split(sizes) for t in tensors))


class GradTape:
    """Sums the gradient of a weight used at every step of a recurrence in one matmul.

    Autograd would build and add a full [out, in] gradient matrix at every step: for a
    2048-wide LSTM that is ~200 MB of memory traffic per step, which dominates CPU training
    time. The tape keeps each step's (input, output gradient) instead; the last of the
    steps' backward calls (``pending`` reaches 0) returns the whole sum. Every taped step
    must reach the loss, or the weight would get no gradient. One tape per weight and
    forward pass.
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


def taped_linear(x: Tensor, weight: Tensor, tape: GradTape | None, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T (+ bias)``, the weight's gradient through ``tape`` when autograd records."""
    out = x.mm(weight.t()) if tape is None or not torch.is_grad_enabled() else _TapedMatmul.apply(x, weight, tape)
    return out if bias is None else out + bias


class TapedLinear:
    """An ``nn.Linear`` called once per time step, its weight gradient through one tape."""

    def __init__(self, linear: nn.Linear):
        self.linear, self.tape = linear, GradTape()

    def __call__(self, x: Tensor) -> Tensor:
        return taped_linear(x, self.linear.weight, self.tape, self.linear.bias)


class TapedLSTMCell:
    """An ``nn.LSTMCell`` stepped through time: both weights' gradients through tapes.

    ``input_gates`` may be computed for many rows at once (inputs that do not depend on
    the recurrence) and fed to ``step``.
    """

    def __init__(self, cell: nn.LSTMCell):
        self.cell, self.tape_ih, self.tape_hh = cell, GradTape(), GradTape()

    def input_gates(self, x: Tensor) -> Tensor:
        return taped_linear(x, self.cell.weight_ih, self.tape_ih, self.cell.bias_ih + self.cell.bias_hh)

    def step(self, x_gates: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """One step given the input's gate term; returns (h, c)."""
        gates = x_gates + taped_linear(h, self.cell.weight_hh, self.tape_hh)
        i, f, g, o = gates.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    def __call__(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        return self.step(self.input_gates(x), h, c)
