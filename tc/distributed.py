"""Data-parallel training across processes (torchrun; gloo on CPU, nccl on CUDA).

Each rank runs a disjoint part of every batch of episodes; the aim is that N processes
make *the same update* as one process with the whole batch, up to float rounding:

- the losses are divided by the whole batch's frame / thought-token counts (known to every
  rank from the data, no communication), so the ranks' gradients *sum* to the one-process
  gradient: one all-reduce of the flattened gradients per update (not DDP's hooks: an
  update accumulates several backward passes, one per truncated-BPTT chunk, and the ranks'
  gradients are summed, not averaged);
- BatchNorm normalises by the statistics of the rows of all ranks (:class:`SyncBatchNorm2d`);
  the lower level calls it once per time step, so the ranks step through the same number of
  time steps, a rank whose episodes have ended running empty steps.

The process group is set up by the caller (stages/train.py); these helpers see a world of
one process when there is none.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the current process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: torch.device, timeout_min: float = 120) -> torch.device:
    """Join the process group described by torchrun's environment (WORLD_SIZE > 1); returns the device to use.

    gloo on CPU; nccl on CUDA, one GPU per process (cuda:LOCAL_RANK). The long ``timeout``
    covers the other ranks waiting while rank 0 validates.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"process {device.index} of this node has no GPU of its own ({torch.cuda.device_count()} "
                             f"visible): use at most that many processes per node (train.nproc / --nproc_per_node)")
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timedelta(minutes=timeout_min), device_id=device)
    else:
        dist.init_process_group("gloo", timeout=timedelta(minutes=timeout_min))
    return device


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks, differentiable: each rank's loss depends on every rank's input, so the
    gradient of an input is the sum over ranks of the output's gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the rows of all ranks together.

    ``torch.nn.SyncBatchNorm`` runs on GPUs only; this one also runs on gloo / CPU. The
    per-channel sums and counts are all-reduced in float64 (so that E[x^2] - E[x]^2 loses
    nothing), differentiably; every rank must call it equally often, in the same order
    (hence the empty steps of tc.train). Running statistics are updated as nn.BatchNorm2d
    does (unbiased variance, ``momentum``).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        c = self.num_features
        x64 = x.double()
        count = x.new_full((1,), x.numel() // c, dtype=torch.float64)
        total = _AllReduceSum.apply(torch.cat([x64.sum((0, 2, 3)), (x64 * x64).sum((0, 2, 3)), count]))
        n = total[2 * c]
        mean = total[:c] / n
        var = total[c : 2 * c] / n - mean * mean
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), self.momentum)
        dtype = torch.promote_types(x.dtype, self.weight.dtype)  # float32 under bfloat16 autocast
        scale = torch.rsqrt(var.to(dtype) + self.eps) * self.weight
        shift = self.bias - mean.to(dtype) * scale
        return (x.to(dtype) * scale[:, None, None] + shift[:, None, None]).to(x.dtype)


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """Make every nn.BatchNorm2d of ``module`` a :class:`SyncBatchNorm2d`, in place (same parameters, same state_dict)."""
    for m in module.modules():
        if type(m) is nn.BatchNorm2d:
            if m.momentum is None or not (m.affine and m.track_running_stats):
                raise ValueError("sync_batchnorm expects affine BatchNorm2d layers with running statistics and a momentum")
            m.__class__ = SyncBatchNorm2d
    return module


def all_reduce_grads(params: Iterable[nn.Parameter]) -> None:
    """Sum the gradients of ``params`` over ranks, with one all-reduce (a missing gradient counts as zero)."""
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view(p.shape))
        offset += p.numel()


def all_reduce_sums(sums: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum a dict of float statistics over ranks."""
    t = torch.tensor(list(sums.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(sums, t.tolist()))


def check_same(value: int, what: str, device: torch.device) -> None:
    """Raise ValueError unless every rank holds the same integer ``value`` (e.g. the resume position)."""
    t = torch.tensor([value, -value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if t[0] != -t[1]:
        raise ValueError(f"{what} differs between ranks ({-t[1].item():.0f} to {t[0].item():.0f})")
