"""An asynchronous looped schedule for a 2-rank pipeline of 2T alternating virtual stages.

Unlike torch.distributed.pipelining's lock-step schedules, each rank runs a fixed breadth-first
order of work and synchronises only on data: a stage's outputs and gradients travel as one flat
buffer, sends are waited for once at the end of the step, and the shapes crossing each boundary
are learned once by an alternating probe. docs/parallelism.md says why, and what it measured.

Both ranks post the step's sends and receives in one shared order (`message_order`) and use no
tags: NCCL matches a rank pair's point-to-point operations by the order in which each rank posted
them and runs each rank's operations towards a peer one after the other, so a receive posted
ahead of the send its peer is waiting for deadlocks both (gloo, which matches by tag, would hide
it). Each receive is posted as early as that order allows: right after this rank's previous send
in it.

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
Message = tuple[str, int, int]
"""("F" | "B", boundary b, micro-batch): stage b's outputs going to stage b + 1, or ("B") the
gradients for them coming back from stage b + 1."""

COST = {"F": 1, "B": 2}
"""Relative cost of a stage's forward and backward in the simulation that orders the messages (an
LSTM's backward is about 2x its forward). Any positive costs give a deadlock-free order; these
decide only which of two messages produced at about the same time goes first."""


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


def bfs_order(pp_rank: int, n_stages: int, m: int, train: bool = True) -> list[Action]:
    """Breadth-first: every micro-batch through stage s before stage s + 2, then (train) the
    backward in reverse. Rank `pp_rank` owns the stages pp_rank, pp_rank + 2, ... of n_stages."""
    mine = range(pp_rank, n_stages, 2)
    fwd = [("F", s, mb) for s in mine for mb in range(m)]
    bwd = [("B", s, mb) for s in reversed(mine) for mb in range(m)]
    return fwd + bwd if train else fwd


def needs(action: Action, n_stages: int) -> Message | None:
    """The message an action waits for: a forward its inputs (s > 0), a backward the gradients
    for its outputs (s < last; the last stage starts from its loss)."""
    kind, s, mb = action
    if kind == "F":
        return ("F", s - 1, mb) if s > 0 else None
    return ("B", s, mb) if s < n_stages - 1 else None


def makes(action: Action, n_stages: int) -> Message | None:
    """The message an action sends: a forward its outputs (s < last), a backward the gradients
    for its inputs (s > 0)."""
    kind, s, mb = action
    if kind == "F":
        return ("F", s, mb) if s < n_stages - 1 else None
    return ("B", s - 1, mb) if s > 0 else None


def sender(msg: Message) -> int:
    """The pipeline rank that sends `msg` (stage b is on rank b % 2; gradients come from b + 1)."""
    kind, b, _ = msg
    return b % 2 if kind == "F" else (b + 1) % 2


@functools.lru_cache(maxsize=64)
def message_order(n_stages: int, m: int, train: bool) -> tuple[Message, ...]:
    """Every message of one step, in the one order both ranks post them.

    Under NCCL the k-th operation a rank posts towards its peer is matched with the k-th the peer
    posts towards it, and each runs only after the rank's earlier ones have finished. So both
    ranks walk this same list, this rank posting the receives in it ahead of time and its sends
    when computed. The order is that in which the messages are produced when both ranks run
    their breadth-first orders with the costs of COST: in that run every message is received
    before it is needed and each rank's sends come in its own order of work, so a rank can
    always post everything ahead of the receive it waits for (no deadlock, whatever the real
    costs). Ties (two messages produced at once) go to rank 0's first.
    """
    orders = [bfs_order(r, n_stages, m, train) for r in range(2)]
    done_at: dict[Message, int] = {}
    produced: list[tuple[int, int, Message]] = []  # (time, rank, message)
    pc, free = [0, 0], [0, 0]
    while pc[0] < len(orders[0]) or pc[1] < len(orders[1]):
        moved = False
        for r in range(2):
            while pc[r] < len(orders[r]):
                a = orders[r][pc[r]]
                need = needs(a, n_stages)
                if need is not None and need not in done_at:
                    break
                free[r] = max(free[r], done_at.get(need, 0) if need is not None else 0) + COST[a[0]]
                out = makes(a, n_stages)
                if out is not None:
                    done_at[out] = free[r]
                    produced.append((free[r], r, out))
                pc[r] += 1
                moved = True
        if not moved:  # not for a breadth-first order on both ranks; a guard for other orders
            raise RuntimeError(f"the two ranks' orders wait for each other at {pc}")
    return tuple(msg for _, _, msg in sorted(produced))


class _Channel:
    """This rank's point-to-point traffic of one step, posted in `order` (see message_order).

    A cursor walks the order: the receives in it are posted as soon as the cursor reaches them,
    and it stops at this rank's next send until the stage that computes it has run.
    """

    def __init__(self, order: Sequence[Message], me: int, peer: int, group, specs: dict[int, Spec],
                 batch: int, device: torch.device) -> None:
        self.order, self.me, self.peer, self.group = order, me, peer, group
        self.specs, self.batch, self.device = specs, batch, device
        self.cursor = 0
        self.recvs: dict[Message, tuple[Any, Tensor]] = {}
        self.sends: list[tuple[Any, Tensor]] = []  # buffers kept alive until the end of the step
        self._post_receives()

    def _post_receives(self) -> None:
        while self.cursor < len(self.order) and sender(self.order[self.cursor]) != self.me:
            msg = self.order[self.cursor]
            spec = self.specs[msg[1]]
            # One flat buffer (B * sum of per-sample sizes,) in the boundary's transport dtype.
            n = sum(self.batch * math.prod(shape) for shape, _ in spec)
            buf = torch.empty(n, dtype=_transport_dtype(spec), device=self.device)
            self.recvs[msg] = (dist.irecv(buf, src=self.peer, group=self.group), buf)
            self.cursor += 1

    def send(self, msg: Message, tensors: Sequence[Tensor]) -> None:
        if self.cursor >= len(self.order) or self.order[self.cursor] != msg:
            nxt = self.order[self.cursor] if self.cursor < len(self.order) else None
            raise RuntimeError(f"send {msg} out of the shared order (next in it: {nxt})")
        buf = _pack(tensors, _transport_dtype(self.specs[msg[1]]))
        self.sends.append((dist.isend(buf, dst=self.peer, group=self.group), buf))
        self.cursor += 1
        self._post_receives()

    def receive(self, msg: Message) -> Tensor:
        """Wait for `msg` (posted already: the order puts it before everything this rank sends
        after needing it) and return its flat buffer."""
        work, buf = self.recvs.pop(msg)
        work.wait()
        return buf

    def finish(self) -> None:
        if self.recvs or self.cursor != len(self.order):
            raise RuntimeError(f"step ended with receives {sorted(self.recvs)} unused, "
                               f"{len(self.order) - self.cursor} messages not posted")
        for work, _ in self.sends:
            work.wait()


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

    def _call(self, s: int, inputs: Sequence[Tensor], kwargs: dict[str, Any]) -> tuple[Tensor, ...]:
        out = self.steps[s // 2](*inputs, **kwargs)
        return out if isinstance(out, tuple) else (out,)

    def _log(self, action: Action, t0: float) -> None:
        if self.events is not None:
            self.events.append((*action, t0, time.time()))

    @torch.no_grad()
    def _probe(self, kwargs: dict[str, Tensor]) -> None:
        """Learn every boundary's Spec by running the stages on sample 0, in turn with the peer.

        The object lists are blocking and strictly alternate (stage s's Spec goes out before the
        sender waits for s + 1's), so the ranks' operations pair up in posting order as NCCL needs
        (under NCCL they travel as tensors on the current CUDA device)."""
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
    def bfs_order(self, train: bool = True) -> list[Action]:
        """This rank's breadth-first order of work (module-level bfs_order)."""
        return bfs_order(self.pp_rank, self.n_stages, self.m, train)

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
        last = self.n_stages - 1
        # Posts the receives that come before this rank's first send in the shared order.
        ch = _Channel(message_order(self.n_stages, self.m, train), self.pp_rank, self.peer, self.group, specs,
                      batch, kwargs_device(kwarg_mbs[0]))
        saved: dict[tuple[int, int], tuple[list[Tensor], tuple[Tensor, ...]]] = {}
        results: dict[int, Tensor] = {}
        for a in self.bfs_order(train):
            kind, s, mb = a
            need, out_msg = needs(a, self.n_stages), makes(a, self.n_stages)
            if kind == "F":
                inputs: list[Tensor] = []
                if need is not None:
                    inputs = _unpack(ch.receive(need), specs[s - 1], batch)
                    if train:
                        inputs = [i.requires_grad_() if i.is_floating_point() else i for i in inputs]
                t0 = time.time()
                with torch.set_grad_enabled(train):
                    outs = self._call(s, inputs, kwarg_mbs[mb])
                self._log(a, t0)
                if out_msg is not None:
                    ch.send(out_msg, outs)
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
                assert need is not None
                grads = _unpack(ch.receive(need), specs[s], batch)
                pairs = [(o, g) for o, g in zip(outs, grads) if o.requires_grad]
                t0 = time.time()
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            self._log(a, t0)
            if out_msg is not None:
                ch.send(out_msg, [i.grad if i.grad is not None else torch.zeros_like(i) for i in inputs])
        ch.finish()
        return [results[mb] for mb in range(self.m)] if self.pp_rank == 1 else None


def kwargs_device(kwargs: dict[str, Tensor]) -> torch.device:
    """The device of a stage's keyword tensors (the image is always among them)."""
    return next(iter(kwargs.values())).device
