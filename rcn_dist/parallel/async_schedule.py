"""An asynchronous looped schedule for a 2-rank pipeline of 2T alternating virtual stages.

Unlike torch.distributed.pipelining's lock-step schedules, each rank runs a fixed breadth-first
order of work and synchronises only on data: every receive of a step is posted up front (one
tagged `irecv` per boundary and micro-batch), a stage's outputs and gradients travel as one flat
buffer, sends are waited for once at the end of the step, and the shapes crossing each boundary
are learned once by an alternating probe. docs/parallelism.md says why, and what it measured.

Events (kind "F" | "B", virtual stage, micro-batch, start, end; time.time() stamps) go to
`events` while it is a list, as for the library's stages.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

Spec = list[tuple[tuple[int, ...], torch.dtype]]
"""What crosses one stage boundary: per tensor, its shape without the batch dimension, and dtype."""
Action = tuple[str, int, int]
"""("F" | "B", virtual stage, micro-batch)."""


def _transport_dtype(spec: Spec) -> torch.dtype:
    # One dtype that holds every tensor of the boundary exactly (bf16 -> fp32 is exact).
    return functools.reduce(torch.promote_types, (d for _, d in spec), torch.float32)


def _pack(tensors: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """Tensors (B, ...) -> one contiguous flat buffer of `dtype` (a copy: the sender keeps it alive)."""
    return torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])


def _unpack(buf: Tensor, spec: Spec, batch: int) -> list[Tensor]:
    """The inverse of _pack: tensors (B, *shape) in their own dtypes."""
    sizes = [batch * math.prod(shape) for shape, _ in spec]
    # Views of the received buffer where the dtype matches (each buffer serves one message only).
    return [p.view(batch, *shape).to(dt) for p, (shape, dt) in zip(buf.split(sizes), spec)]


class AsyncLoopedBFS:
    """The schedule for one rank: `steps[t]` is virtual stage 2t + pp_rank of 2T.

    Rank 0's stages are 0, 2, ..., 2T - 2, rank 1's 1, 3, ..., 2T - 1; stage s sends its outputs
    to stage s + 1 on the other rank and receives its inputs from s - 1. The last stage's output
    goes to `loss_fn(output) -> scalar` (backward) and is returned per micro-batch.
    """

    def __init__(self, steps: Sequence[nn.Module], pp_rank: int, group, n_microbatches: int,
                 loss_fn: Callable[[Tensor], Tensor] | None = None) -> None:
        self.steps, self.pp_rank, self.group, self.m = list(steps), pp_rank, group, n_microbatches
        self.loss_fn = loss_fn
        self.n_stages = 2 * len(self.steps)
        self.peer = dist.get_global_rank(group, 1 - pp_rank) if group is not None else 1 - pp_rank
        self.specs: dict[int, Spec] | None = None  # boundary s (stage s -> s + 1) -> its Spec
        self.events: list | None = None

    # ------------------------------------------------------------------ helpers
    def _my_stages(self) -> range:
        return range(self.pp_rank, self.n_stages, 2)

    def _tag(self, backward: bool, boundary: int, mb: int) -> int:
        return (2 * boundary + int(backward)) * self.m + mb

    def _call(self, s: int, inputs: Sequence[Tensor], kwargs: dict[str, Any]) -> tuple[Tensor, ...]:
        out = self.steps[s // 2](*inputs, **kwargs)
        return out if isinstance(out, tuple) else (out,)

    def _log(self, action: Action, t0: float) -> None:
        if self.events is not None:
            self.events.append((*action, t0, time.time()))

    @torch.no_grad()
    def _probe(self, kwargs: dict[str, Tensor]) -> None:
        """Learn every boundary's Spec by running the stages on sample 0, in turn with the peer."""
        one = {k: v[:1] for k, v in kwargs.items()}
        specs: dict[int, Spec] = {}
        with torch.random.fork_rng(devices=[]):
            for s in self._my_stages():
                inputs: list[Tensor] = []
                if s > 0:
                    box: list[Any] = [None]
                    dist.recv_object_list(box, src=self.peer, group=self.group)
                    specs[s - 1] = box[0]
                    inputs = [torch.zeros(1, *shape, dtype=dt, device=kwargs_device(one)) for shape, dt in box[0]]
                if s < self.n_stages - 1:
                    outs = self._call(s, inputs, one)
                    specs[s] = [(tuple(o.shape[1:]), o.dtype) for o in outs]
                    dist.send_object_list([specs[s]], dst=self.peer, group=self.group)
        self.specs = specs

    # ------------------------------------------------------------------ the schedule
    def bfs_order(self) -> list[Action]:
        """Breadth-first: every micro-batch through stage s before stage s + 2, then the
        backward in reverse."""
        mine = self._my_stages()
        return [("F", s, mb) for s in mine for mb in range(self.m)] + \
            [("B", s, mb) for s in reversed(mine) for mb in range(self.m)]

    def run(self, kwarg_mbs: Sequence[dict[str, Tensor]], train: bool = True) -> list[Tensor] | None:
        """One step over M micro-batches (each a dict of keyword tensors for this rank's stages).

        With `train`, gradients of sum over micro-batches of loss_fn(last output) accumulate in the
        parameters, in breadth-first order. Returns the
        last stage's outputs per micro-batch on rank 1, None on rank 0.
        """
        if len(kwarg_mbs) != self.m:
            raise ValueError(f"expected {self.m} micro-batches, got {len(kwarg_mbs)}")
        if self.specs is None:
            self._probe(kwarg_mbs[0])
        specs = self.specs
        assert specs is not None
        batch = next(iter(kwarg_mbs[0].values())).shape[0]
        device = kwargs_device(kwarg_mbs[0])
        last = self.n_stages - 1
        sends: list[tuple[Any, Tensor]] = []

        def post(backward: bool, boundary: int, mb: int) -> tuple[Any, Tensor]:
            spec = specs[boundary]
            buf = torch.empty(sum(batch * math.prod(shape) for shape, _ in spec), dtype=_transport_dtype(spec), device=device)
            return dist.irecv(buf, src=self.peer, group=self.group, tag=self._tag(backward, boundary, mb)), buf

        def send(backward: bool, boundary: int, mb: int, tensors: Sequence[Tensor]) -> None:
            buf = _pack(tensors, _transport_dtype(specs[boundary]))
            sends.append((dist.isend(buf, dst=self.peer, group=self.group,
                                     tag=self._tag(backward, boundary, mb)), buf))

        order = self.bfs_order() if train else [a for a in self.bfs_order() if a[0] == "F"]
        # Every receive of the step is posted now: forward inputs of stages s > 0, and (training)
        # the gradients for the outputs of stages s < last. A stage then waits only for its own.
        posted = {a: post(a[0] == "B", a[1] - 1 if a[0] == "F" else a[1], a[2]) for a in order
                  if (a[0] == "F" and a[1] > 0) or (a[0] == "B" and a[1] < last)}
        saved: dict[tuple[int, int], tuple[list[Tensor], tuple[Tensor, ...]]] = {}
        results: dict[int, Tensor] = {}
        for a in order:
            kind, s, mb = a
            if kind == "F":
                inputs: list[Tensor] = []
                if s > 0:
                    work, buf = posted.pop(a)
                    work.wait()
                    inputs = _unpack(buf, specs[s - 1], batch)
                    if train:
                        inputs = [i.requires_grad_() if i.is_floating_point() else i for i in inputs]
                t0 = time.time()
                with torch.set_grad_enabled(train):
                    outs = self._call(s, inputs, kwarg_mbs[mb])
                self._log(a, t0)
                if s < last:
                    send(False, s, mb, outs)
                else:
                    results[mb] = outs[0]
                if train:
                    saved[(s, mb)] = (inputs, outs)
                continue
            # Backward of stage s for micro-batch mb: gradients for its outputs come from s + 1.
            inputs, outs = saved.pop((s, mb))
            if s == last:
                assert self.loss_fn is not None
                t0 = time.time()
                self.loss_fn(outs[0]).backward()
            else:
                work, buf = posted.pop(a)
                work.wait()
                grads = _unpack(buf, specs[s], batch)
                pairs = [(o, g) for o, g in zip(outs, grads) if o.requires_grad]
                t0 = time.time()
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            self._log(a, t0)
            if s > 0:
                send(True, s - 1, mb, [i.grad if i.grad is not None else torch.zeros_like(i) for i in inputs])
        for work, _ in sends:
            work.wait()
        return [results[mb] for mb in range(self.m)] if self.pp_rank == 1 else None


def kwargs_device(kwargs: dict[str, Tensor]) -> torch.device:
    """The device of a stage's keyword tensors (the image is always among them)."""
    return next(iter(kwargs.values())).device
