"""The pipeline benchmark (`rcn bench --workload pipeline`): what the 2-stage pipeline buys on CPU.

For one config and micro-batch counts M it times a training step (forward, backward, Adam) of the
unsplit model, the same with M accumulated micro-batches ("accum"), the 2-stage pipeline (2
processes x 1 thread) and 2-process data parallelism ("dp"), and each stack's busy time, from
which the balance bound (enc + dec) / max(enc, dec) follows. Inputs are synthetic.
docs/parallelism.md ("Measured on the 2-core CPU machine") has the method and the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from torch import Tensor
from torch.distributed.pipelining import PipelineStage, ScheduleInterleaved1F1B, ScheduleLoopedBFS

from rcn_dist.bench.base import rcn_inputs
from rcn_dist.config import Config, ConfigError, apply_overrides, from_dict, resolve
from rcn_dist.model import RCN
from rcn_dist.parallel import collectives
from rcn_dist.parallel.engine import build_adam
from rcn_dist.parallel.env import detect, free_port, init_process_group
from rcn_dist.parallel.pipeline import PipelineRank, make_groups

SCHEDULES = {"looped_bfs": ScheduleLoopedBFS, "interleaved_1f1b": ScheduleInterleaved1F1B}
"""torch.distributed.pipelining's lock-step looped schedules, for comparison with ours."""


class _Unsplit:
    """The whole model on one process; a step cuts the batch into m accumulated pieces."""

    def __init__(self, cfg: Config) -> None:
        torch.manual_seed(cfg.train.seed)
        self.model = RCN(cfg.model)
        # The pipeline ranks' Adam, so that the rows differ only in how the work is split.
        self.opt = build_adam(self.model.parameters(), cfg.train.lr, cfg.train.weight_decay, fused=True)

    def grads(self, x, y, eps, m: int) -> None:
        for xs, ys, es in zip(x.chunk(m), y.chunk(m), eps.chunk(m)):
            loss, _ = self.model.loss(xs, ys, es)
            (loss / m).backward()

    def update(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class LoggedStage(PipelineStage):
    """A PipelineStage that records when it ran each micro-batch's forward and backward.

    Events go to `events` (a list shared by a rank's stages) as (kind "F" | "B", virtual stage,
    micro-batch, start, end) with time.time() stamps, while `events` is not None.
    """

    events: list | None = None

    def _logged(self, kind: str, run: Callable, chunk: int, *args, **kwargs):
        t0 = time.time()
        out = run(chunk, *args, **kwargs)
        if self.events is not None:
            self.events.append((kind, self.stage_index, chunk, t0, time.time()))
        return out

    def forward_one_chunk(self, fwd_chunk_id: int, *args, **kwargs):
        return self._logged("F", super().forward_one_chunk, fwd_chunk_id, *args, **kwargs)

    def backward_one_chunk(self, bwd_chunk_id: int, *args, **kwargs):
        return self._logged("B", super().backward_one_chunk, bwd_chunk_id, *args, **kwargs)


class LockStepRank(PipelineRank):
    """A pipeline rank on one of torch.distributed.pipelining's lock-step looped schedules
    (cfg.parallel.pipeline_schedule), in place of our asynchronous one: for comparison only."""

    def __init__(self, cfg: Config, pp_rank: int, pp_group, dp_group=None, **kwargs) -> None:
        super().__init__(cfg, pp_rank, pp_group, dp_group, **kwargs)
        check_lockstep(cfg)
        self.stages = [LoggedStage(st, 2 * t + pp_rank, 2 * cfg.model.T, self.device, group=pp_group)
                       for t, st in enumerate(self.stage_modules)]
        # scale_grads=False: the default divides a shared parameter's gradient by M once per
        # stage that uses it (wrong by up to 90%); the loss is divided by the rank's batch instead.
        self.lockstep = SCHEDULES[cfg.parallel.pipeline_schedule](
            self.stages, cfg.parallel.micro_batches, loss_fn=self._loss, scale_grads=False)

    def record_events(self, on: bool = True) -> list:
        events = super().record_events(on)
        for s in self.stages:
            s.events = self.events
        return events

    def _run(self, kw: dict[str, Tensor], train: bool) -> list[Tensor] | None:
        run = self.lockstep.step if train else self.lockstep.eval
        if self.pp_rank == 0:
            run(**kw)
            return None
        return [run(**kw, target=kw["x"])]  # the target is required, and unused


def check_lockstep(cfg: Config) -> None:
    """Refuse a micro-batch count torch's schedule cannot run on 2 ranks."""
    m = cfg.parallel.micro_batches
    rounds = max(1, m // 2)
    if cfg.parallel.pipeline_schedule == "interleaved_1f1b" and m % rounds:
        raise ConfigError(f"parallel.micro_batches={m} is not supported by parallel.pipeline_schedule="
                          f"interleaved_1f1b on 2 ranks (needs a multiple of max(1, M // 2) = {rounds}; "
                          "e.g. 1, 2, 3, 4, 6, 8) or use looped_bfs")


def make_rank(cfg: Config, pp_rank: int, pp_group, dp_group=None, **kwargs) -> PipelineRank:
    """The rank runner of cfg.parallel.pipeline_schedule: ours (async_bfs) or one of torch's."""
    cls = PipelineRank if cfg.parallel.pipeline_schedule == "async_bfs" else LockStepRank
    return cls(cfg, pp_rank, pp_group, dp_group, **kwargs)


def _worker(rank: int, port: int, cfg_json: str, ms: Sequence[int], schedules: Sequence[str], steps: int,
            warmup: int, out: str) -> None:
    """One of 2 processes, 1 thread each. Every round times each variant once, interleaved, so
    that load from elsewhere on the machine falls on all of them alike; the median round counts.
    The unsplit variants run on rank 0 while rank 1 waits (1 process, 1 core)."""
    torch.set_num_threads(1)
    init_process_group(detect({"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_PORT": str(port)}, cuda=False))
    pp_group, dp_group = make_groups(2)
    base = from_dict(json.loads(cfg_json))
    b = base.train.batch_size
    x, y, eps = rcn_inputs(base, b)
    fixed = ["parallel.pipeline_stages=2", "parallel.zero_stage=0", f"train.micro_batch={b}", "train.precision=fp32"]
    runners = {(s, m): make_rank(apply_overrides(base, [*fixed, f"parallel.pipeline_schedule={s}",
                                                        f"parallel.micro_batches={m}"]), rank, pp_group, dp_group)
               for s in schedules for m in ms}
    unsplit, dp = _Unsplit(base), _Unsplit(base)
    half = slice(rank * b // 2, (rank + 1) * b // 2)
    t: dict[str, list[float]] = {}

    def timed(key: str, fn: Callable[[], Any]) -> None:
        collectives.barrier()
        tic = time.perf_counter()
        fn()
        collectives.barrier()
        t.setdefault(key, []).append(time.perf_counter() - tic)

    def dp_step() -> None:
        dp.grads(x[half], y[half], eps[half], 1)
        grads = [p.grad for p in dp.model.parameters()]
        flat = torch.nn.utils.parameters_to_vector(grads)  # one all-reduce for all the gradients
        flat = collectives.all_reduce(flat)
        torch.nn.utils.vector_to_parameters(flat / 2, grads)
        dp.update()

    for _ in range(warmup + steps):
        for m in ms:
            if rank == 0:
                timed(f"accum{m}", lambda m=m: (unsplit.grads(x, y, eps, m), unsplit.update()))
            else:
                timed(f"accum{m}", lambda: None)
            for sched in schedules:
                key = f"{sched}:{m}"
                r = runners[(sched, m)]
                events = r.record_events()
                timed(f"pipeline{key}", lambda r=r: (r.forward_backward(x, y, eps, b),
                                                     r.optimizer_step(r.reduce_gradients())))
                t.setdefault(f"busy{key}", []).append(sum(e[4] - e[3] for e in events))
        timed("dp", dp_step)
    res = {k: statistics.median(v[warmup:]) for k, v in t.items()}
    Path(out, f"rank{rank}.json").write_text(json.dumps(res))
    collectives.destroy()  # its barrier first (docs/parallelism.md, Limits)


def bench_pipeline(cfg: Config, ms: Sequence[int] = (1, 2, 4, 8), steps: int = 5,
                   out: Callable[[str], Any] = print, warmup: int = 2,
                   compare: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Time unsplit / accum / pipeline / dp for each M (see the module docstring). The pipeline
    runs the config's schedule, and in the same rounds each schedule named in `compare` (their
    rows carry "schedule"; the balance row is the config's schedule's).

    Returns rows {"mode", "M", "step_s", "img_per_s"} (pipeline rows add "speedup_vs_accum"),
    then one {"mode": "balance", "enc_s", "dec_s", "bound", "best_M", "best_speedup",
    "fraction_of_bound", "loadavg_1min", "cpus"} row. `out` gets a readable line per row.
    """
    b = cfg.train.batch_size
    bad = [m for m in ms if b % m]
    if bad:
        raise ConfigError(f"train.batch_size={b} is not divisible by micro-batch count(s) {bad}")
    with tempfile.TemporaryDirectory() as tmp:
        main = cfg.parallel.pipeline_schedule
        schedules = [main] + [c for c in compare if c != main]
        mp.start_processes(_worker, args=(free_port(), cfg.to_json(), list(ms), schedules, steps, warmup, tmp),
                           nprocs=2, start_method="spawn")
        r0, r1 = (json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(2))
    accum = {m: r0[f"accum{m}"] for m in ms}
    rows: list[dict[str, Any]] = [{"mode": "unsplit", "M": min(ms), "step_s": accum[min(ms)]}]
    for m in ms:
        rows.append({"mode": "accum", "M": m, "step_s": accum[m]})
        for sched in schedules:
            key = f"{sched}:{m}"
            pipe = max(r0[f"pipeline{key}"], r1[f"pipeline{key}"])
            rows.append({"mode": "pipeline", "M": m, "schedule": sched, "step_s": pipe,
                         "speedup_vs_accum": accum[m] / pipe, "enc_busy_s": r0[f"busy{key}"],
                         "dec_busy_s": r1[f"busy{key}"]})
    rows.append({"mode": "dp", "M": 1, "step_s": max(r0["dp"], r1["dp"])})
    for r in rows:
        r["img_per_s"] = b / r["step_s"]
        extra = (f"  {r['speedup_vs_accum']:.2f}x vs accum  (stages busy: encoder {1e3 * r['enc_busy_s']:.0f}, "
                 f"decoder {1e3 * r['dec_busy_s']:.0f} ms)") if "speedup_vs_accum" in r else ""
        name = f"pipeline/{r['schedule']}" if r["mode"] == "pipeline" and len(schedules) > 1 else r["mode"]
        out(f"{name:9s} M={r['M']}  {1e3 * r['step_s']:8.1f} ms/step  {r['img_per_s']:7.1f} img/s{extra}")
    # Stack costs: busy time of each rank with one micro-batch (nothing overlaps, no contention).
    enc, dec = r0[f"busy{main}:{min(ms)}"], r1[f"busy{main}:{min(ms)}"]
    bound = (enc + dec) / max(enc, dec)
    best = max((r for r in rows if r["mode"] == "pipeline" and r["schedule"] == main),
               key=lambda r: r["speedup_vs_accum"])
    balance = {"mode": "balance", "schedule": main, "enc_s": enc, "dec_s": dec, "bound": bound, "best_M": best["M"],
               "best_speedup": best["speedup_vs_accum"], "fraction_of_bound": best["speedup_vs_accum"] / bound,
               "loadavg_1min": os.getloadavg()[0], "cpus": os.cpu_count()}
    out(f"stacks: encoder {1e3 * enc:.1f} ms, decoder {1e3 * dec:.1f} ms per step (fwd+bwd); "
        f"bound {bound:.2f}x; best pipeline M={best['M']}: {best['speedup_vs_accum']:.2f}x over accum "
        f"= {100 * balance['fraction_of_bound']:.0f}% of the bound (load average {balance['loadavg_1min']:.1f} "
        f"on {balance['cpus']} CPUs: 2-process rows need 2 idle cores)")
    return [*rows, balance]


def main(argv: list[str] | None = None) -> int:
    """python -m rcn_dist.bench.pipeline --config configs/bench_pipeline_balanced.toml"""
    ap = argparse.ArgumentParser(prog="python -m rcn_dist.bench.pipeline", description=__doc__.splitlines()[0])
    ap.add_argument("--preset")
    ap.add_argument("--config")
    ap.add_argument("--ms", default="1,2,4,8", help="micro-batch counts, comma separated")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--compare", default="", help="other schedules to time in the same rounds, comma separated")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    cfg = resolve(args.preset or (None if args.config else "small"), args.config, args.overrides)
    rows = bench_pipeline(cfg, tuple(int(m) for m in args.ms.split(",")), args.steps,
                          compare=[c for c in args.compare.split(",") if c])
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
