"""The pipeline's point-to-point traffic replayed under NCCL's rules.

gloo matches a message with its receive by tag; NCCL ignores tags: the k-th operation rank A
posts towards B is matched with the k-th B posts towards A (a send with a receive of the same
size and dtype), and each rank runs its operations towards a peer one after the other on one
stream, so a pending operation holds back every later one (pytorch issues 94819, 125079). A
schedule can therefore pass every gloo test and hang on GPUs. These tests record what each rank
posts (kind, peer, elements, dtype) and where it blocks on a wait, in real 2-rank gloo steps and
in single-process runs of the schedule with a stand-in for torch.distributed, and replay the two
ranks' traces under those rules in Python: the schedule's old order (every receive of the step
posted up front, kept below as `TaggedUpFront`) deadlocks, the shared order does not.
"""

from __future__ import annotations

import inspect
import os
import types
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from test_pipeline import MB, _batch, _cfg
from torch import Tensor, nn

from rcn_dist.parallel import async_schedule as sched_mod
from rcn_dist.parallel.async_schedule import AsyncLoopedBFS, _pack, _transport_dtype, _unpack, kwargs_device

Event = tuple
"""("post", op id, "send" | "recv", peer rank, elements, dtype name, batch id | None, tag) or
("wait", op id): the host blocks until that operation has completed."""


# ---------------------------------------------------------------- recording
class _Work:
    """A torch Work that records the waits on it (for the operations `ids`) before waiting."""

    def __init__(self, work: Any, ids: list[int], events: list[Event]) -> None:
        self._work, self._ids, self._events = work, ids, events

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        self._events.extend(("wait", i) for i in self._ids)
        return self._work.wait(*args, **kwargs) if self._work is not None else True

    def __bool__(self) -> bool:
        return True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


class P2PRecorder:
    """Within `with`, every isend / irecv / send / recv / batch_isend_irecv of this process is
    recorded in `events` and still performed (torch.distributed and its c10d module both patched:
    send_object_list and P2POp reach the c10d names). A blocking send or recv is a post and its
    wait; the operations of one batch_isend_irecv share a batch id (NCCL runs them as a group)."""

    NAMES = ("isend", "irecv", "send", "recv", "batch_isend_irecv")

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._ids = 0
        self._batches = 0
        self._nested = False

    def __enter__(self) -> P2PRecorder:
        import torch.distributed.distributed_c10d as c10d

        self._mods = (dist, c10d)
        self._real = {n: getattr(c10d, n) for n in self.NAMES}
        self._saved = [(mod, n, getattr(mod, n)) for mod in self._mods for n in self.NAMES]
        self.wrappers = {"isend": self._p2p("isend", "send", False), "irecv": self._p2p("irecv", "recv", False),
                         "send": self._p2p("send", "send", True), "recv": self._p2p("recv", "recv", True),
                         "batch_isend_irecv": self._batch}
        for mod in self._mods:
            for n, f in self.wrappers.items():
                setattr(mod, n, f)
        return self

    def __exit__(self, *exc: Any) -> None:
        for mod, n, f in self._saved:
            setattr(mod, n, f)

    def _post(self, kind: str, tensor: Tensor, peer: int, tag: int, batch: int | None = None) -> int:
        i, self._ids = self._ids, self._ids + 1
        self.events.append(("post", i, kind, peer, tensor.numel(), str(tensor.dtype), batch, tag))
        return i

    @staticmethod
    def _peer(args: dict[str, Any], kind: str) -> int:
        glob, local = ("dst", "group_dst") if kind == "send" else ("src", "group_src")
        if args.get(glob) is not None:
            return args[glob]
        from torch.distributed.distributed_c10d import _get_default_group

        return dist.get_global_rank(args.get("group") or _get_default_group(), args[local])

    def _p2p(self, name: str, kind: str, blocking: bool):
        real = self._real[name]
        sig = inspect.signature(real)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self._nested:  # inside send / recv (torch's call isend / irecv) or a batch: recorded there
                return real(*args, **kwargs)
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            b = bound.arguments
            i = self._post(kind, b["tensor"], self._peer(b, kind), b.get("tag") or 0)
            if blocking:
                self.events.append(("wait", i))
                self._nested = True
                try:
                    return real(*args, **kwargs)
                finally:
                    self._nested = False
            return _Work(real(*args, **kwargs), [i], self.events)

        return wrapper

    def _batch(self, p2p_op_list: list) -> list:
        bid, self._batches = self._batches, self._batches + 1
        sends = (self._real["isend"], self.wrappers["isend"])
        ids = [self._post("send" if op.op in sends else "recv", op.tensor, op.peer, op.tag, bid)
               for op in p2p_op_list]
        self._nested = True
        try:
            works = self._real["batch_isend_irecv"](p2p_op_list)
        finally:
            self._nested = False
        if len(works) == len(ids):
            return [_Work(w, [i], self.events) for w, i in zip(works, ids)]
        return [_Work(w, ids, self.events) for w in works]  # coalesced: one work for the group


# ---------------------------------------------------------------- the replay
@dataclass
class Replay:
    """What became of the traces under NCCL's rules: `problem` is "" (every operation completed,
    every wait returned), "deadlock", "mismatch" (a send met a receive of another size or dtype)
    or "unmatched" (an operation with no counterpart). `blocked`: per stuck rank, the operation
    it waits for, the head of its stream and where that head's counterpart is."""

    problem: str = ""
    detail: list[str] = field(default_factory=list)
    blocked: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problem


def replay(traces: Sequence[Sequence[Event]]) -> Replay:
    """Run the ranks' recorded traces (traces[r] is rank r's) under NCCL's point-to-point rules.

    - Matching: per ordered pair (A -> B), the j-th send A posts towards B meets the j-th receive B
      posts from A; tags play no part. They must agree in elements and dtype.
    - Streams: each rank runs its operations towards one peer in posting order; an operation runs
      when every earlier one of that stream has completed, and completes when its counterpart is
      running too (the head of the peer's stream). The operations of one batch_isend_irecv are one
      step of the stream (an NCCL group: they run together).
    - Host: posting never blocks; a wait blocks the rank (nothing after it is posted) until the
      operation has completed.
    """
    n = len(traces)
    ops: dict[tuple[int, int], tuple] = {}
    sends: dict[tuple[int, int], list] = defaultdict(list)
    recvs: dict[tuple[int, int], list] = defaultdict(list)
    for r, tr in enumerate(traces):
        for e in tr:
            if e[0] == "post":
                ops[(r, e[1])] = e
                (sends[(r, e[3])] if e[2] == "send" else recvs[(e[3], r)]).append((r, e[1]))
    partner: dict[tuple[int, int], tuple[int, int]] = {}
    for key in set(sends) | set(recvs):
        for s, rv in zip(sends[key], recvs[key]):
            partner[s], partner[rv] = rv, s

    def label(op: tuple[int, int]) -> str:
        e = ops[op]
        return f"rank {op[0]} {e[2]} #{op[1]} ({e[4]} x {e[5]}, tag {e[7]})"

    streams: dict[tuple[int, int], list[dict]] = defaultdict(list)  # (rank, peer) -> steps, oldest first
    posted: set[tuple[int, int]] = set()
    done: set[tuple[int, int]] = set()
    pc = [0] * n
    while True:
        moved = False
        for r, tr in enumerate(traces):
            while pc[r] < len(tr):
                e = tr[pc[r]]
                if e[0] == "wait":
                    if (r, e[1]) not in done:
                        break
                else:
                    q = streams[(r, e[3])]
                    if e[6] is not None and q and q[-1]["batch"] == e[6]:
                        q[-1]["ops"].append((r, e[1]))
                    else:
                        q.append({"batch": e[6], "ops": [(r, e[1])]})
                    posted.add((r, e[1]))
                pc[r] += 1
                moved = True
        for (r, p), q in list(streams.items()):
            other = streams.get((p, r))
            if not q or not other:
                continue
            mine, theirs = q[0]["ops"], other[0]["ops"]
            if all(partner.get(o) in theirs for o in mine) and all(partner.get(o) in mine for o in theirs):
                for o in mine:
                    a, b = ops[o], ops[partner[o]]
                    if (a[4], a[5]) != (b[4], b[5]):
                        return Replay("mismatch", [f"{label(o)} meets {label(partner[o])}"])
                done.update(mine + theirs)
                q.pop(0)
                other.pop(0)
                moved = True
        if not moved:
            break
    pending = [o for q in streams.values() for s in q for o in s["ops"]]
    if all(pc[r] == len(tr) for r, tr in enumerate(traces)):
        if not pending:
            return Replay()
        return Replay("unmatched", [f"{label(o)} never completes" for o in pending])
    res = Replay("deadlock")
    for r, tr in enumerate(traces):
        if pc[r] == len(tr):
            continue
        waits = (r, tr[pc[r]][1])
        head = streams[(r, ops[waits][3])][0]["ops"][0]
        mate = partner.get(head)
        info: dict[str, Any] = {"waits": waits, "head": head, "partner": mate, "partner_posted": mate in posted}
        text = f"rank {r} waits for {label(waits)}; its stream's oldest pending operation is {label(head)}"
        if mate is None:
            text += ", which the peer never posts"
        elif mate not in posted:
            text += f", whose counterpart {label(mate)} is not posted yet"
        else:
            ahead = streams[(mate[0], r)][0]["ops"][0]
            info["partner_behind"] = ahead
            text += f", whose counterpart {label(mate)} is posted but queued behind {label(ahead)}"
        res.blocked[r] = info
        res.detail.append(text)
    return res


# ---------------------------------------------------------------- the old order, frozen
class TaggedUpFront(AsyncLoopedBFS):
    """The schedule's earlier posting order, kept as the reference that NCCL deadlocks on: every
    receive of the step posted before the first send, each with its own tag, sends as computed."""

    def _tag(self, backward: bool, boundary: int, mb: int) -> int:
        return (2 * boundary + int(backward)) * self.m + mb

    def run(self, kwarg_mbs: Sequence[dict[str, Tensor]], train: bool = True) -> list[Tensor] | None:
        d = sched_mod.dist  # the module's, so that a stand-in for torch.distributed applies here too
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
            n = sum(batch * torch.Size(shape).numel() for shape, _ in spec)
            buf = torch.empty(n, dtype=_transport_dtype(spec), device=device)
            return d.irecv(buf, src=self.peer, group=self.group, tag=self._tag(backward, boundary, mb)), buf

        def send(backward: bool, boundary: int, mb: int, tensors: Sequence[Tensor]) -> None:
            buf = _pack(tensors, _transport_dtype(specs[boundary]))
            sends.append((d.isend(buf, dst=self.peer, group=self.group, tag=self._tag(backward, boundary, mb)), buf))

        order = self.bfs_order() if train else [a for a in self.bfs_order() if a[0] == "F"]
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
                with torch.set_grad_enabled(train):
                    outs = self._call(s, inputs, kwarg_mbs[mb])
                if s < last:
                    send(False, s, mb, outs)
                else:
                    results[mb] = outs[0]
                if train:
                    saved[(s, mb)] = (inputs, outs)
                continue
            inputs, outs = saved.pop((s, mb))
            if s == last:
                assert self.loss_fn is not None
                self.loss_fn(outs[0]).backward()
            else:
                work, buf = posted.pop(a)
                work.wait()
                grads = _unpack(buf, specs[s], batch)
                pairs = [(o, g) for o, g in zip(outs, grads) if o.requires_grad]
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            if s > 0:
                send(True, s - 1, mb, [i.grad if i.grad is not None else torch.zeros_like(i) for i in inputs])
        for work, _ in sends:
            work.wait()
        return [results[mb] for mb in range(self.m)] if self.pp_rank == 1 else None


def _tag_of(m: int, backward: bool, boundary: int, mb: int) -> int:
    return (2 * boundary + int(backward)) * m + mb


# ---------------------------------------------------------------- the replay itself
def _post(i: int, kind: str, n: int = 4, peer: int = 1, dtype: str = "torch.float32", batch=None) -> Event:
    return ("post", i, kind, peer, n, dtype, batch, 0)


def test_the_replay_applies_nccls_rules_to_hand_written_traces():
    ok = [[_post(0, "send", peer=1), _post(1, "recv", peer=1), ("wait", 1)],
          [_post(0, "recv", peer=0), ("wait", 0), _post(1, "send", peer=0)]]
    assert replay(ok).ok
    # Both post a receive first and wait for it: each one's send sits behind its receive.
    crossed = [[_post(0, "recv", peer=1), _post(1, "send", peer=1), ("wait", 0)],
               [_post(0, "recv", peer=0), _post(1, "send", peer=0), ("wait", 0)]]
    res = replay(crossed)
    assert res.problem == "deadlock" and set(res.blocked) == {0, 1}
    assert res.blocked[0]["partner"] == (1, 1) and res.blocked[0]["partner_behind"] == (1, 0)
    # The same with the pair posted as one batch (an NCCL group) runs.
    grouped = [[_post(0, "recv", peer=1, batch=0), _post(1, "send", peer=1, batch=0), ("wait", 0)],
               [_post(0, "recv", peer=0, batch=0), _post(1, "send", peer=0, batch=0), ("wait", 0)]]
    assert replay(grouped).ok
    # Tags would have told these apart; NCCL does not: the sizes disagree.
    assert replay([[_post(0, "send", 4), _post(1, "send", 8)],
                   [_post(0, "recv", 8, peer=0), _post(1, "recv", 4, peer=0)]]).problem == "mismatch"
    assert replay([[_post(0, "send", 4, dtype="torch.float64")],
                   [_post(0, "recv", 4, peer=0)]]).problem == "mismatch"
    # A wait before posting what the peer needs first.
    res = replay([[_post(0, "recv", peer=1), ("wait", 0), _post(1, "send", peer=1)],
                  [_post(0, "recv", peer=0), ("wait", 0), _post(1, "send", peer=0)]])
    assert res.problem == "deadlock" and not res.blocked[0]["partner_posted"]
    assert replay([[_post(0, "send")], []]).problem == "unmatched"


# ---------------------------------------------------------------- in one process, any T and M
class _Toy(nn.Module):
    """A stand-in virtual stage: one carried tensor (B, 3); the last stage returns it, not a tuple."""

    def __init__(self, last: bool) -> None:
        super().__init__()
        self.w, self.last = nn.Parameter(torch.ones(3)), last

    def forward(self, *carry: Tensor, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        h = x * self.w + (carry[0] if carry else 0)
        return h if self.last else (h,)


def _stand_in_dist(pp_rank: int, events: list[Event]) -> types.SimpleNamespace:
    """isend / irecv that only record (a receive's buffer is zeroed): each rank's step runs alone
    and its trace is what it would post, since the order never depends on when data arrives."""
    ids = iter(range(10**6))

    def p2p(kind: str):
        def op(tensor: Tensor, dst: int | None = None, src: int | None = None, group=None, tag: int = 0) -> _Work:
            if kind == "recv":
                tensor.zero_()
            i = next(ids)
            events.append(("post", i, kind, 1 - pp_rank, tensor.numel(), str(tensor.dtype), None, tag))
            return _Work(None, [i], events)
        return op

    return types.SimpleNamespace(isend=p2p("send"), irecv=p2p("recv"), get_global_rank=lambda g, r: r)


def _local_traces(cls: type[AsyncLoopedBFS], T: int, m: int, train: bool,
                  monkeypatch: pytest.MonkeyPatch) -> list[list[Event]]:
    traces = []
    for r in range(2):
        events: list[Event] = []
        monkeypatch.setattr(sched_mod, "dist", _stand_in_dist(r, events))
        sched = cls([_Toy(r == 1 and t == T - 1) for t in range(T)], r, None, m, loss_fn=lambda o: o.sum())
        sched.specs = {b: [((3,), torch.float32)] for b in range(2 * T - 1)}  # no probe: no peer here
        sched.run([{"x": torch.ones(2, 3)} for _ in range(m)], train=train)
        traces.append(events)
    monkeypatch.undo()
    return traces


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_shared_order_replays_for_any_length_and_micro_batch_count(train, monkeypatch):
    """The schedule's own run(), T = 1..6 drawing steps, M = 1..6: the replay completes; the old
    up-front order deadlocks wherever a rank has a receive to post before its first send."""
    for T in range(1, 7):
        for m in range(1, 7):
            res = replay(_local_traces(AsyncLoopedBFS, T, m, train, monkeypatch))
            assert res.ok, (T, m, res.problem, res.detail)
            old = replay(_local_traces(TaggedUpFront, T, m, train, monkeypatch))
            # Eval with T = 1 has one message; training always has a gradient to wait for.
            assert old.problem == ("deadlock" if train or T > 1 else ""), (T, m, old.problem)


# ---------------------------------------------------------------- real 2-rank gloo steps
RECORDED = [("async_bfs", m, torch.float32) for m in (1, 2, 4)] + [("tagged_up_front", m, torch.float32)
                                                                   for m in (1, 2, 4)] \
    + [("async_bfs", 2, torch.float64)] + [(s, m, torch.float32) for s in ("looped_bfs", "interleaved_1f1b")
                                           for m in (1, 2, 4)]


def _record_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One rank: for each of RECORDED, a training step (with the probe: the first) and an eval
    step of a fresh runner, recorded."""
    from rcn_dist.bench.pipeline import make_rank
    from rcn_dist.parallel.pipeline import make_groups

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    pp_group, dp_group = make_groups(world)
    result = []
    for schedule, m, dtype in RECORDED:
        frozen = schedule == "tagged_up_front"
        runner = make_rank(_cfg(m, "async_bfs" if frozen else schedule), rank % 2, pp_group, dp_group, dtype=dtype)
        if frozen:
            runner.schedule = TaggedUpFront(runner.stage_modules, rank % 2, pp_group, m, loss_fn=runner._loss)
        x, y, eps = _batch(0, 0, dtype)
        with P2PRecorder() as train_rec:
            terms = runner.forward_backward(x, y, eps, MB)
        with P2PRecorder() as eval_rec:
            ev = runner(x, y, eps)
        result.append({"train": train_rec.events, "eval": eval_rec.events, "terms": terms,
                       "eval_loss": ev["loss"], "device": runner.device})
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> list[list[dict]]:
    import torch.multiprocessing as mp

    from rcn_dist.parallel.env import free_port

    out = tmp_path_factory.mktemp("p2p")
    mp.start_processes(_record_worker, args=(2, free_port(), str(out)), nprocs=2, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _runs(recorded: list[list[dict]], schedule: str, dtype: torch.dtype = torch.float32):
    for i, (s, m, dt) in enumerate(RECORDED):
        if s == schedule and dt == dtype:
            yield m, recorded[0][i], recorded[1][i]


@pytest.mark.slow
def test_old_order_deadlocks_under_nccl_rules_and_shared_order_runs(recorded):
    """Recorded gloo steps of the tiny model (T = 4), M = 1, 2, 4, training (the first, with the
    probe's object lists) and eval: the shared order replays to the end; the old order deadlocks,
    first on both ranks' oldest receives: rank 0 waits for stage 1's output of micro-batch 0,
    whose send rank 1 cannot post before it has stage 0's, and that send of rank 0's is queued
    behind the very receive rank 0 waits on."""
    for m, r0, r1 in _runs(recorded, "async_bfs"):
        for kind in ("train", "eval"):
            res = replay([r0[kind], r1[kind]])
            assert res.ok, (m, kind, res.problem, res.detail)
            assert all(e[7] == 0 for e in r0[kind] + r1[kind] if e[0] == "post")  # no tags
        probe = [e for e in r0["train"] if e[0] == "post" and e[3] == 1][:2]
        assert [(e[2], e[5]) for e in probe] == [("send", "torch.int64"), ("send", "torch.uint8")]
    for m, r0, r1 in _runs(recorded, "tagged_up_front"):
        for kind in ("train", "eval"):
            res = replay([r0[kind], r1[kind]])
            assert res.problem == "deadlock", (m, kind, res.problem)
            ops0 = {e[1]: e for e in r0[kind] if e[0] == "post"}
            ops1 = {e[1]: e for e in r1[kind] if e[0] == "post"}
            b0, b1 = res.blocked[0], res.blocked[1]
            # Rank 0 waits for (F, boundary 1, mb 0), its oldest pending op; rank 1's counterpart
            # send is not posted (rank 1 is blocked itself).
            assert b0["waits"] == b0["head"] and ops0[b0["head"][1]][2:3] == ("recv",)
            assert ops0[b0["head"][1]][7] == _tag_of(m, False, 1, 0) and not b0["partner_posted"]
            # Rank 1 waits for (F, boundary 0, mb 0): rank 0 has posted that send, behind its receive.
            assert b1["waits"] == b1["head"] and ops1[b1["head"][1]][7] == _tag_of(m, False, 0, 0)
            assert b1["partner_posted"] and b1["partner_behind"] == b0["head"]
        # Same arithmetic either way: the order of posting changes nothing else.
        new = next(r for mm, *r in _runs(recorded, "async_bfs") if mm == m)
        assert torch.equal(r1["terms"], new[1]["terms"]) and torch.equal(r1["eval_loss"], new[1]["eval_loss"])


@pytest.mark.slow
def test_torch_lockstep_schedules_replay(recorded):
    """torch's looped BFS and interleaved 1F1B (the benchmark's comparison) also run under the rules."""
    for schedule in ("looped_bfs", "interleaved_1f1b"):
        for m, r0, r1 in _runs(recorded, schedule):
            for kind in ("train", "eval"):
                res = replay([r0[kind], r1[kind]])
                assert res.ok, (schedule, m, kind, res.problem, res.detail[:4])


@pytest.mark.slow
def test_encoder_rank_eval_terms_match_the_decoder_ranks(recorded):
    """The encoder rank's zero terms are on its device and in the decoder rank's dtype (fp64 here)."""
    (m, r0, r1), = _runs(recorded, "async_bfs", torch.float64)
    assert r0["eval_loss"].device == r0["device"] and r1["eval_loss"].device == r1["device"]
    assert r0["eval_loss"].dtype == r1["eval_loss"].dtype == torch.float64
    assert r0["eval_loss"].shape == r1["eval_loss"].shape == (MB,) and not r0["eval_loss"].any()


def test_encoder_rank_eval_terms_are_made_on_the_rank_device(monkeypatch):
    """PipelineRank.__call__ on the encoder rank (its schedule returns None) builds the zeros on
    runner.device: with a CPU-only torch the rank's device is stood in by "meta", which a tensor
    only reaches by being made there."""
    from rcn_dist.model.losses import TERMS
    from rcn_dist.parallel.pipeline import PipelineRank

    runner = PipelineRank(_cfg(2), 0, None, None, dtype=torch.float64)
    monkeypatch.setattr(runner, "_run", lambda kw, train: None)
    runner.device = torch.device("meta")
    x, y, eps = _batch(0, 0, torch.float64)
    out = runner(x, y, eps)
    assert set(out) == {*TERMS, "correct"}
    for v in out.values():
        assert v.device == torch.device("meta") and v.dtype == torch.float64 and v.shape == (MB,)
