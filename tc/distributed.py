"""Data-parallel training across processes (torchrun; gloo on CPU, nccl on CUDA).

Each rank runs a disjoint part of every batch of episodes; the aim is that N processes
make *the same update* as one process with the whole batch, up to float rounding:

- every rank divides its losses by the same constants of the data set (tc.train), so the
  ranks' gradients *sum* to the one-process gradient: one all-reduce of the flattened gradients per update (not DDP's hooks: an
  update accumulates several backward passes, one per truncated-BPTT chunk, and the ranks'
  gradients are summed, not averaged);
- BatchNorm normalises by the statistics of the rows of all ranks (:class:`SyncBatchNorm2d`);
  both levels call it once per time step, so the ranks step through the same number of
  time steps, a rank whose episodes have ended running empty steps.

The process group is set up by the caller (stages/train.py); these helpers see a world of
one process when there is none.
"""

from __future__ import annotations

import logging
import os
import signal
from datetime import timedelta
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from tc.model import BatchNorm2d
from tc.params import Stopped, UserError


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the current process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launch(nproc: int, script: str, argv: list[str]) -> None:
    """Run ``script argv`` in ``nproc`` processes on this machine, as ``torchrun --standalone
    --nproc_per_node nproc`` would, with torchrun's launcher in this process.

    Each process prints its own error; a failure, or a signal that stops the run, then ends
    in one line rather than torchrun's traceback and failure report (~35 lines).
    """
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default, without its banner (train.threads sets torch's)
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)  # the exit codes again
    try:
        run(get_args_parser().parse_args(["--standalone", "--nproc_per_node", str(nproc), script, *argv]))
    except SignalException as err:  # the launcher has stopped the processes: tc.params.user_errors ends it so
        stop = Stopped(f"signal {err.sigval}")
        stop.signum = err.sigval
        stop.add_note(f"so were the {nproc} training processes")
        raise stop from None
    except ChildFailedError as err:
        first_rank, first = err.get_first_failure()
        # The launcher stops the others with SIGTERM once one fails, and lists them as failures too.
        failed = [r for r, f in err.failures.items() if r == first_rank or f.exitcode != -signal.SIGTERM]
        how = f"killed by signal {-first.exitcode}" if first.exitcode < 0 else f"exit status {first.exitcode}"
        if len(failed) == 1:  # killed by a signal, it may have said nothing
            raise UserError(f"training process {first.local_rank} of {nproc} failed ({how}), the others were stopped"
                            + ("; its message is above" if first.exitcode > 0 else "")) from None
        raise UserError(f"{len(failed)} of the {nproc} training processes failed, process {first.local_rank} first "
                        f"({how}); their messages are above") from None


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


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    dist.all_reduce(x)
    return x


class SyncBatchNorm2d(BatchNorm2d):
    """The agent's BatchNorm2d with the statistics of the rows of all ranks together.

    ``torch.nn.SyncBatchNorm`` runs on GPUs only; this one also runs on gloo / CPU. The
    per-channel sums and counts are all-reduced, and in the backward pass so are the sums
    that carry the statistics' gradient (each rank's loss depends on every rank's rows), so
    every rank normalises, accumulates running statistics and back-propagates as one
    process with the whole batch would. Every rank must call it equally often, in the same
    order (hence the empty steps of tc.train).
    """

    all_reduce = staticmethod(_all_reduce_sum)


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """Make every agent BatchNorm2d of ``module`` a :class:`SyncBatchNorm2d`, in place (same parameters and state)."""
    for m in module.modules():
        if type(m) is BatchNorm2d:
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
