"""Submitting training runs with submitit: Slurm where there is one, local processes otherwise.

The job is a Checkpointable callable that always resumes from its RUN_DIR, so a requeue after a
timeout or a preemption continues where the last checkpoint left off. On SIGUSR2 every rank
checkpoints at the next step boundary first (rcn_dist.signals.StopFlag), then submitit requeues; one
that comes before the first step stops the attempt with nothing to save, and the requeued job
starts over from the last checkpoint (or from scratch).

`submit(train_argv, folder, nodes=..., ...)` from Python (docs/slurm.md), `rcn submit [options]
[--] <rcn train arguments>` from a shell; `--sweep key=v1,v2` submits one array job with a
RUN_DIR per point, then compares the runs.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path
from typing import Any

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission

from rcn_dist import signals
from rcn_dist.cli import run_main
from rcn_dist.config import ConfigError
from rcn_dist.errors import RcnError
from rcn_dist.report import main as report_main
from rcn_dist.signals import EXIT_STOPPED


class TrainJob(Checkpointable):
    """`rcn train <argv>` as a submitit job; resumes from its --out directory when requeued."""

    def __init__(self, argv: list[str]):
        self.argv = list(argv)

    def __call__(self) -> dict[str, Any]:
        # First, before torch is imported: from now on a stop signal is recorded for the training
        # loop, which checkpoints and then hands it to submitit's handler (rcn_dist.signals,
        # signals.StopFlag); submitit's handlers are given back when the run is over.
        owner = signals.catch()
        try:
            # Threads per task: the CPUs Slurm gave it (torch would otherwise take every core). Set
            # before torch is imported, which reads it once.
            os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("SLURM_CPUS_PER_TASK", "1"))
            from rcn_dist.train import main  # local: here, after catch() and OMP_NUM_THREADS (see above)

            rc = run_main(main, self.argv)
        finally:
            if owner:
                signals.release()
        if rc == EXIT_STOPPED and submitit.JobEnvironment().global_rank != 0:
            # Task 0 decides what a stop means: submitit's handler there requeued the job (and
            # exited), or it reports the stop below. A result file from this task would outlive
            # the requeue and could be read as the job's outcome, so this task leaves none.
            sys.exit(EXIT_STOPPED)
        if rc == EXIT_STOPPED:
            # Stopped by a signal that was not submitit's (SIGTERM, SIGUSR1): the checkpoint is
            # written (or, before the first step, there was none to write); resubmitting the same
            # job resumes it.
            raise RcnError(f"training stopped by a signal (exit {rc}); resubmit to resume")
        if rc != 0:
            raise RcnError(f"training exited with code {rc}")
        return {"run_dir": _out_of(self.argv), "exit": rc}

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        # The state is on disk already (written by every rank at the step boundary).
        return DelayedSubmission(TrainJob(self.argv))


def _out_of(argv: list[str]) -> str:
    for i, a in enumerate(argv):
        if a == "--out" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--out="):
            return a.split("=", 1)[1]
    raise ConfigError("rcn submit needs --out RUN_DIR among the training arguments (the job resumes from it)")


def check_train_args(train_argv: list[str]) -> str:
    """Refuse here, before anything is queued, what `rcn train` would refuse in the job; returns RUN_DIR."""
    # Local: a job unpickles TrainJob, importing this module, before TrainJob.__call__ catches the
    # signals; the training modules (torch) must not load at this module's top (rcn_dist.signals).
    from rcn_dist.train import build_parser, config_from_args

    out = _out_of(train_argv)
    config_from_args(build_parser().parse_intermixed_args(train_argv))
    return out


def make_executor(folder: str | Path, cluster: str | None = None, nodes: int = 1, tasks_per_node: int = 1,
                  gpus_per_node: int = 0, cpus_per_task: int = 1, timeout_min: int = 60,
                  partition: str | None = None, max_requeues: int = 3, signal_delay_s: int = 120,
                  **slurm: Any) -> submitit.AutoExecutor:
    """An AutoExecutor (Slurm if `sbatch` is there, else local processes) set up for training.

    GPUs are requested per node and every task sees all of its node's GPUs, so that DeepSpeed's
    choice of device by local rank holds; no CUDA_VISIBLE_DEVICES is exported per task.
    """
    # The number of requeues is the Slurm executor's constructor argument, not a job parameter.
    ex = submitit.AutoExecutor(folder=str(folder), cluster=cluster, slurm_max_num_timeout=max_requeues)
    params: dict[str, Any] = dict(nodes=nodes, tasks_per_node=tasks_per_node, cpus_per_task=cpus_per_task,
                                  timeout_min=timeout_min)
    if gpus_per_node:
        params["gpus_per_node"] = gpus_per_node
    if ex.cluster == "slurm":
        params["slurm_signal_delay_s"] = signal_delay_s
        if partition:
            params["slurm_partition"] = partition
        params.update({f"slurm_{k}" if not k.startswith("slurm_") else k: v for k, v in slurm.items()})
    ex.update_parameters(**params)
    return ex


def submit(train_argv: list[str], folder: str | Path, **executor_kw: Any) -> submitit.Job:
    """Submit one training run; returns the submitit job."""
    _out_of(train_argv)
    return make_executor(folder, **executor_kw).submit(TrainJob(train_argv))


def sweep_points(specs: list[str]) -> list[dict[str, str]]:
    """`key=v1,v2` specs -> the cross product as a list of {key: value}."""
    axes = []
    for spec in specs:
        if "=" not in spec:
            raise ConfigError(f"sweep {spec!r} is not of the form section.field=v1,v2")
        key, values = spec.split("=", 1)
        vals = [v for v in values.split(",") if v]
        if not vals:
            raise ConfigError(f"sweep {spec!r} lists no values")
        axes.append([(key, v) for v in vals])
    return [dict(p) for p in itertools.product(*axes)]


def submit_sweep(train_argv: list[str], specs: list[str], folder: str | Path,
                 **executor_kw: Any) -> list[tuple[Path, submitit.Job]]:
    """One array job, one RUN_DIR per point: <--out>/<key>=<value>,..."""
    base = Path(_out_of(train_argv))
    i = train_argv.index("--out") if "--out" in train_argv else None
    points = sweep_points(specs)
    ex = make_executor(folder, **executor_kw)
    runs = []
    with ex.batch():
        for point in points:
            name = ",".join(f"{k}={v}" for k, v in point.items()).replace("/", "_")
            argv = list(train_argv)
            if i is not None:
                argv[i + 1] = str(base / name)
            else:
                argv = [a for a in argv if not a.startswith("--out=")] + ["--out", str(base / name)]
            argv += [f"{k}={v}" for k, v in point.items()]
            runs.append((base / name, ex.submit(TrainJob(argv))))
    return runs


def follow(job: submitit.Job, poll_s: float = 2.0, out=sys.stdout) -> Any:
    """Stream a job's stdout (task 0) until it ends; then return its result."""
    seen = 0
    while True:
        done = job.done()
        if job.paths.stdout.exists():
            text = job.paths.stdout.read_text(errors="replace")
            if len(text) > seen:
                out.write(text[seen:])
                out.flush()
                seen = len(text)
        if done:
            return job.result()
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_argv: list[str] = []
    if "--" in argv:
        k = argv.index("--")
        argv, train_argv = argv[:k], argv[k + 1:]
    ap = argparse.ArgumentParser(prog="rcn submit", allow_abbrev=False,
                                 description="Submit `rcn train` with submitit (Slurm, or local processes "
                                 "where there is no Slurm). Arguments it does not know, and all after `--`, "
                                 "go to `rcn train`.")
    ap.add_argument("--folder", help="submitit's log folder (default: RUN_DIR/submitit)")
    ap.add_argument("--cluster", choices=("slurm", "local", "debug"), help="default: auto")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--tasks-per-node", type=int, help="default: --gpus-per-node (one rank per GPU), else 1")
    ap.add_argument("--gpus-per-node", type=int, default=0)
    ap.add_argument("--cpus-per-task", type=int, default=1)
    ap.add_argument("--timeout-min", type=int, default=60)
    ap.add_argument("--partition")
    ap.add_argument("--max-requeues", type=int, default=3)
    ap.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                    help="submit one job per point of the cross product (repeatable)")
    ap.add_argument("--no-follow", action="store_true", help="print the job id(s) and return")
    args, rest = ap.parse_known_args(argv)
    train_argv = rest + train_argv
    if not train_argv:
        raise ConfigError("give the training arguments, e.g. rcn submit --preset tiny --data DIR --out runs/x")
    out_dir = Path(check_train_args(train_argv))
    folder = args.folder or str(out_dir / "submitit")
    kw = dict(cluster=args.cluster, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
              tasks_per_node=args.tasks_per_node or args.gpus_per_node or 1, cpus_per_task=args.cpus_per_task,
              timeout_min=args.timeout_min, partition=args.partition, max_requeues=args.max_requeues)
    if args.sweep:
        for point in sweep_points(args.sweep):  # a bad sweep value fails here, not in the jobs
            check_train_args(train_argv + [f"{k}={v}" for k, v in point.items()])
        runs = submit_sweep(train_argv, args.sweep, folder, **kw)
        for d, j in runs:
            print(f"submitted {j.job_id}: {d}", flush=True)
        if args.no_follow:
            return 0
        failed = 0
        for d, j in runs:
            try:
                j.result()
            except Exception as e:  # one failed point should not hide the others
                failed += 1
                print(f"{d}: failed: {str(e).strip().splitlines()[-1] if str(e).strip() else e}", file=sys.stderr)

        report_main(["--runs", *[str(d) for d, _ in runs], "--out", str(out_dir / "compare")])
        return 1 if failed else 0
    job = submit(train_argv, folder, **kw)
    print(f"submitted {job.job_id} ({job.__class__.__name__}); logs in {folder}", flush=True)
    if not args.no_follow:
        follow(job)
    return 0
