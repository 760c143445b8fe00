"""Every collective of rcn_dist, on a device its process group serves.

A process group started as "nccl" (every GPU launch: parallel/env.py) has no CPU backend: an
all-reduce of a CPU tensor fails with "No backend type associated with device type cpu", and
gloo (every CPU launch) takes no CUDA tensor. So nothing in the package calls a torch.distributed
collective directly (tests/test_collectives.py scans the source): it calls these, which move the
tensor to the group's device and back, and give NCCL's barrier the rank's GPU.

Why one helper rather than a group serving both devices ("cpu:gloo,cuda:nccl"): the values that
are reduced (loss parts, evaluation sums, gradient norms) live on the rank's device already, and
keeping them there keeps the step free of host syncs; a second backend would also open a second
set of connections per group, and DeepSpeed's own groups are started as one backend only.
Point-to-point traffic (the pipeline's sends and receives) is the schedule's own
(parallel/async_schedule.py); it runs on the rank's device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def device_for_backend(backend: str, device: str | torch.device) -> torch.device:
    """The device a collective of a `backend` group runs on for a rank whose device is `device`:
    the rank's GPU under NCCL, the CPU under gloo. Pure: usable on a recorded launch environment."""
    return torch.device(device) if backend == "nccl" else torch.device("cpu")


def active() -> bool:
    """Whether a process group is up (collectives are then needed; without one they are no-ops)."""
    return dist.is_available() and dist.is_initialized()


def comm_device(group=None) -> torch.device:
    """The device collectives of `group` (None: the default group) must use on this rank."""
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(t: Tensor, op: str = "sum", group=None) -> Tensor:
    """`t` reduced over `group` (sum, max or min), on t's own device and dtype; without a process
    group, `t` itself. A contiguous `t` already on the group's device is reduced in place; any
    other is copied there and back."""
    if not active():
        return t
    buf = t.to(comm_device(group), non_blocking=True).contiguous()
    dist.all_reduce(buf, op=_OPS[op], group=group)
    return buf.to(t.device)


def any_rank(flag: bool, group=None) -> bool:
    """Whether `flag` holds on any rank (a collective: every rank calls it; False, True -> True)."""
    t = torch.tensor([float(flag)], dtype=torch.float64)
    return bool(all_reduce(t, op="max", group=group).item() > 0)


def barrier(group=None) -> None:
    """Every rank of `group` got here. Under NCCL on the rank's own GPU (NCCL would otherwise guess
    one from the rank number, which is wrong where each task sees a single GPU)."""
    if not active():
        return
    if dist.get_backend(group) == "nccl":
        dist.barrier(group=group, device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier(group=group)


def broadcast_object(obj, src: int = 0, group=None):
    """A picklable object from global rank `src` to every rank of `group` (on its device)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group, device=comm_device(group))
    return box[0]


def new_group(ranks: list[int]):
    """A process group of `ranks`, on the default group's backend (a collective: every rank of
    the world calls it, for every group, in the same order; RankLayout.groups)."""
    return dist.new_group(ranks)


def destroy() -> None:
    """The barrier, then the process group's teardown. Without the barrier, 2 of 6 gloo runs ended
    with SIGABRT ("terminate called without an active exception"); with it, 0 of 30."""
    if not active():
        return
    barrier()
    dist.destroy_process_group()
