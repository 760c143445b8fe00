"""The trainer: one loop for every layout.

A layout (rcn_dist.parallel.layouts: a registered LayoutSpec builds it) is a `Layout`: what one
step's forward and backward, the optimizer step, the LR, evaluation, saving and loading mean for
it. Everything else lives here, once, naming no layout: the run's set-up (`setup_run`: threads,
loggers, stop flag, process group, run directory, the checkpoint to resume), `run_loop`
(agreement on the losses, logging, eval and checkpoint cadence, stop signals) and the exit codes.
The test metrics are rcn_dist.evaluation's.

Exit codes: 0 finished; 3 stopped on a signal (resumable: run again on the same RUN_DIR), after a
checkpoint at the step boundary, or before the first step with nothing to save; 2 bad input or
configuration; 4 the loss became NaN/inf.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rcn_dist import console, signals, speed, testhooks
from rcn_dist.config import Config
from rcn_dist.data.loader import Manifest, TrainStream
from rcn_dist.errors import RcnError
from rcn_dist.evaluation import periodic_stream
from rcn_dist.files import atomic_write
from rcn_dist.loggers import make_loggers
from rcn_dist.model import noise_for, step_noise_seed
from rcn_dist.model.losses import TERMS
from rcn_dist.parallel import checkpoint as ckpt
from rcn_dist.parallel import collectives
from rcn_dist.parallel.env import LaunchEnv, RankGroups, init_process_group
from rcn_dist.parallel.layouts import Layout, LayoutSpec, Run, check_resume

EXIT_STOPPED = signals.EXIT_STOPPED
EXIT_DIVERGED = 4


class Diverged(RcnError):
    exit_code = EXIT_DIVERGED


AUTO_WORKERS_GPU = 2
"""data.num_workers=-1 on a GPU: two workers decode and binarise a batch of 64 paper-size images
in well under a paper-size step; more would only hold more batches in memory."""


def loader_workers(data_cfg, device: str, dp_size: int) -> int:
    """DataLoader workers per rank for `data_cfg` (the DataConfig): data.num_workers, or for -1 ("auto")
    none on a CPU and AUTO_WORKERS_GPU on a GPU, as many as the training shards go round to
    (each (rank, worker) slot needs a shard of its own)."""
    if data_cfg.num_workers >= 0:
        return data_cfg.num_workers
    if not device.startswith("cuda"):
        return 0
    shards = len(Manifest.load(data_cfg.dir, data_cfg.cache_dir or None).shards("train"))
    return max(0, min(AUTO_WORKERS_GPU, shards // max(dp_size, 1)))


def position_from_samples(stream, samples: int, dp_size: int) -> dict[str, int]:
    """A loader position for this layout after `samples` images were seen by the whole job.

    Used after a world-size change, when the saved per-rank positions no longer apply: the
    epoch and the fraction of it are carried over, the exact sample order is not.
    """
    per_batch = stream.batch_size * dp_size
    per_epoch = stream.batches_per_epoch * per_batch
    return stream.state_dict() | {"epoch": samples // per_epoch, "batch": (samples % per_epoch) // per_batch}


@dataclass(frozen=True)
class StepFlag:
    """What the step's one all-reduce agreed on, read back to the host once: the one place that
    knows how the step's vector is laid out (`pack` builds it, `unpack` reads it)."""

    parts: dict[str, float]
    """Each of TERMS: its batch mean summed over the ranks that hold a loss."""
    stopping: bool
    """Some rank received a stop signal."""
    diverged: bool
    """Some rank's loss parts are not finite."""

    @staticmethod
    def pack(parts: torch.Tensor, stopping: bool) -> torch.Tensor:
        """This rank's vector, on parts' device: the TERMS parts (float64, len(TERMS)), then a
        stop count and a non-finite count (0 or 1 each), to be summed over the ranks."""
        stopped_here = torch.tensor([float(stopping)], dtype=torch.float64).to(parts.device, non_blocking=True)
        return torch.cat([parts, stopped_here, (~torch.isfinite(parts).all()).double().reshape(1)])

    @classmethod
    def unpack(cls, values: list[float]) -> StepFlag:
        """The all-reduced vector `pack` laid out, as named fields."""
        n = len(TERMS)
        stop_count, nonfinite_count = values[n], values[n + 1]
        return cls(dict(zip(TERMS, values[:n])), stop_count > 0, nonfinite_count > 0)

    @classmethod
    def agree(cls, parts: torch.Tensor, stopping: bool) -> StepFlag:
        """The step's one collective: every rank's parts, stop and non-finite flags, summed."""
        return cls.unpack(collectives.all_reduce(cls.pack(parts, stopping)).tolist())


def setup_run(cfg: Config, launch: LaunchEnv, run_dir: Path, spec: LayoutSpec,
              engine_json: dict[str, Any] | None = None) -> Run:
    """What every layout does before building its model: CPU threads, loggers, the stop flag, the
    process group (and what `spec` asks of it: its comm set-up, its groups), the checkpoint to
    resume (rank 0 reads and checks it, every rank is told; `spec` checks it is one it resumes),
    config.json. `engine_json`: the --deepspeed JSON, for a layout that builds a DeepSpeed engine."""
    if launch.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Several ranks on one machine (data-parallel or pipeline) must not each spin up a thread
        # per core: oversubscribed OpenMP threads spin while their partners wait, and a step gets
        # many times slower.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // launch.local_world_size))
    testhooks.min_step_seconds()  # a bad test knob stops every rank with one line, before the process group
    logger = make_loggers(cfg, run_dir, launch.rank)  # before the process group: a missing package stops all ranks
    stop = signals.StopFlag().install()
    init_process_group(launch)
    spec.init_comm(launch)
    train_cfg = cfg.train
    settings = speed.choose(launch.device, train_cfg.deterministic, train_cfg.compile, train_cfg.cuda_graphs)
    speed.apply(settings)
    out = console.Console(launch.rank == 0)
    if collectives.any_rank(stop.signum != 0):
        # A signal before the first step (e.g. while torch was imported), on any rank: stop now,
        # all ranks alike, before the model is built. Nothing was trained, so nothing is saved;
        # the next attempt starts (or resumes) from what the run directory already holds.
        out.info(f"stop signal ({signals.names(signals.received()) or 'on another rank'}) before the first "
                 f"step: nothing to checkpoint; exit {EXIT_STOPPED} (run again on {run_dir} to resume)")
        logger.close()
        try:
            _end_run(True, cfg.train.steps, out, run_dir, stop)
        finally:
            stop.restore()
        raise signals.Stopped()
    try:
        # Rank 0 alone reads and CRCs the candidates; every rank gets its pick (or its error).
        latest, notes = ckpt.agree_latest(run_dir, launch.rank)
        if latest is not None:
            check_resume(spec, latest, cfg, launch)  # before config.json: a refused run leaves the run's as it was
    except RcnError:
        logger.close()
        stop.restore()
        raise
    if launch.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "config.json", cfg.to_json())
    for n in notes:
        out.info(n)
    if latest is not None:
        ckpt.set_aside_damaged(run_dir, latest, launch.rank)  # newer ones rank 0 found damaged
    groups = launch.ranks.groups() if spec.groups else RankGroups()
    return Run(cfg, launch, run_dir, out, logger, stop, latest, settings, engine_json=engine_json or {},
               groups=groups)


def run_loop(run: Run, layout: Layout) -> int:
    """Resume from run.latest if there is one, train to cfg.train.steps, then tear the process
    group down. Returns the exit code: 0, or EXIT_STOPPED after a stop signal (and a
    checkpoint). Raises Diverged, before the update, when any rank's loss is not finite."""
    cfg, launch, out = run.cfg, run.launch, run.out
    train_cfg, data_cfg = cfg.train, cfg.data
    cuda = launch.device.startswith("cuda")
    workers = loader_workers(data_cfg, launch.device, launch.dp_size)
    stream = TrainStream(data_cfg.dir, train_cfg.micro_batch, launch.dp_rank, launch.dp_size, train_cfg.seed,
                         num_workers=workers, binarize=data_cfg.binarize, shuffle=data_cfg.shuffle,
                         cache_dir=data_cfg.cache_dir or None, pin_memory=cuda)
    step, samples = 0, 0
    if run.latest is not None:
        state = layout.load(run.latest)
        step, samples = state["step"], state["samples"]
        loader = state["loader"]
        stream.load_state_dict(loader if loader is not None
                               else position_from_samples(stream, samples, launch.dp_size))
        out.info(f"resumed from {run.latest} (step {step})")
    progress = out.progress(total=train_cfg.steps, start=step, label=f"train {cfg.name}")
    try:
        try:
            stopped = _steps(run, layout, stream, step, samples, progress)
        finally:
            progress.close()
            run.logger.close()
        return _end_run(stopped, train_cfg.steps, out, run.run_dir, run.stop)
    finally:
        run.stop.restore()  # after the teardown: a signal during it must not kill the rank


def _steps(run: Run, layout: Layout, stream, step: int, samples: int, progress) -> bool:
    # The loop of run_loop(); True when a stop signal ended it early.

    train_cfg, stop, logger = run.cfg.train, run.stop, run.logger
    rank, device = run.launch.rank, run.launch.device
    last_good = str(run.latest) if run.latest else "none"
    min_step_s = testhooks.min_step_seconds()
    batches = iter(stream)
    while step < train_cfg.steps:
        testhooks.fault_point("step", step, rank)
        tic = time.perf_counter()
        # The loss parts stay on the device (float64) until the step's one collective: no host
        # sync inside the micro-batches.
        parts = torch.zeros(len(TERMS), dtype=torch.float64, device=device)
        for micro in range(train_cfg.grad_accum):
            batch = next(batches)
            eps = noise_for(batch, step_noise_seed(train_cfg.seed, step), run.cfg, device=device)
            terms = layout.forward_backward(batch, eps, micro == train_cfg.grad_accum - 1)
            if terms is not None:
                parts += terms
        if min_step_s:  # test-only: before the collective, so a signal during the sleep stops this step
            time.sleep(max(0.0, min_step_s - (time.perf_counter() - tic)))
        # One collective per step: the loss parts, any rank's stop signal, any non-finite loss,
        # agreed before the update so that a NaN never reaches the weights. Then one host read.
        flag = StepFlag.agree(parts / train_cfg.grad_accum, stop.signum != 0)
        if flag.diverged:
            raise Diverged(f"loss is not finite at step {step + 1}; last good checkpoint: {last_good}")
        layout.update()
        step += 1
        samples += train_cfg.batch_size
        dt = time.perf_counter() - tic
        row = {"step": step} | {k: v / layout.loss_ranks for k, v in flag.parts.items()} | {
            "lr": layout.lr(), "img_per_s": train_cfg.batch_size / dt, "samples": samples}
        if rank == 0 and (step % train_cfg.log_every == 0 or step == train_cfg.steps):
            logger.log(row)
        progress.update(step, row)

        at_end = step == train_cfg.steps
        if (train_cfg.eval_every and step % train_cfg.eval_every == 0) or at_end:
            ev_stream = periodic_stream(run.cfg, train_cfg.micro_batch, run.launch.dp_rank, run.launch.dp_size)
            ev = layout.evaluate(ev_stream, 0 if at_end else train_cfg.eval_batches) | {
                "step": step, "kind": "eval", "full": at_end or not train_cfg.eval_batches}
            if rank == 0:
                logger.log(ev)
            progress.eval(ev)
        stopping = flag.stopping
        if (train_cfg.ckpt_every and step % train_cfg.ckpt_every == 0) or at_end or stopping:
            loop_state = {"step": step, "samples": samples, "loader": stream.state_dict()}
            last_good = str(layout.save(step, loop_state))
        if stopping and not at_end:
            run.out.info(f"stop signal ({signals.names(signals.received()) or 'on another rank'}): "
                         f"checkpointed at step {step} in {last_good}; "
                         f"exit {EXIT_STOPPED} (run again on {run.run_dir} to resume)")
            return True
    return False


def _end_run(stopped: bool, steps: int, out, run_dir: Path, stop: signals.StopFlag) -> int:
    """After the loop, on every rank: the last line, the process group's teardown and, under
    submitit after a stop, the requeue. Returns the exit code. The stop signals stay caught
    throughout: one that comes now is recorded, and a finished run still ends with 0."""
    if not stopped:
        out.info(f"done: {steps} steps; run directory {run_dir}")
    testhooks.pause("teardown")
    collectives.destroy()
    if stopped:
        stop.hand_over()  # under submitit: task 0 requeues the job and exits here
        return EXIT_STOPPED
    if stop.received:
        out.info(f"stop signal ({signals.names(signals.received())}) after the last step: "
                 "the run is complete; exit 0")
    return 0
