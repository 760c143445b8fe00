"""Every test hook of the package, in one place.

The tests drive real processes (DeepSpeed engines, torchrun, Slurm, submitit) and need a kill, a
pause or a slow step to land exactly where they look, not by timing. Each hook below is an
environment variable that is unset outside the tests, and unset it does nothing: each function
returns at once, or returns the no-op value. The production code calls one function per hook,
on one line, and reads no RCN_* test variable itself.

| variable | what it does | read by |
|---|---|---|
| RCN_FAULT=<point>:<step>[:<SIGNAL>][@<rank>] | the process sends itself SIGNAL (default SIGKILL) at a fault point | `fault_point`, `fault_armed` |
| RCN_TEST_PAUSE=<point>[,<point>...][@<rank>] | holds the process at a point until a stop signal arrives (at most 120 s) | `pause` |
| RCN_TEST_MIN_STEP_S=<seconds> | every optimizer step lasts at least that long | `min_step_seconds` |
| RCN_DUMP_LOADED_STATE=<file> | rank 0 writes the engine's state right after a resume's load | `dump_loaded_state_path` |
| RCN_SKIP_MEMORY_CHECK=1 | skips the start-up memory estimate's refusal | `skip_memory_check` |
| RCN_DS_SHM=1 | leaves DeepSpeed's CPU shared-memory all-reduce op on | `ds_shm_comm` |

Fault points ("step" and the checkpoint's "ds_save", "checkpoint", "complete", "prune") are
listed at `fault_point`; pause points ("start", "teardown", "exit") at `pause`.

This module imports nothing heavy: `pause("start")` runs before torch is imported.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

from rcn_dist import signals
from rcn_dist.config import ConfigError

KNOBS = ("RCN_FAULT", "RCN_TEST_PAUSE", "RCN_TEST_MIN_STEP_S", "RCN_DUMP_LOADED_STATE",
         "RCN_SKIP_MEMORY_CHECK", "RCN_DS_SHM")
"""Every test variable, for the docs test that checks this table and for a clean environment."""


def fault_point(point: str, step: int, rank: int = 0) -> None:
    """RCN_FAULT=<point>:<step>[:<SIGNAL>][@<rank>]: send this process SIGNAL (default SIGKILL)
    when it reaches `point` at `step`, on rank 0 unless another is named. Points:
      "step"        the start of an optimizer step (`step` = the steps done so far);
      "ds_save"     inside DeepSpeed's engine.save_checkpoint, right after it wrote its first file
                    on this rank (its other files, its commit and its closing barrier not done);
      "checkpoint"  after the engine's files, before this rank's loop state and RNG;
      "complete"    rank 0, after COMPLETE was written, before `latest` is replaced;
      "prune"       rank 0, pruning: after the oldest pruned checkpoint lost its COMPLETE,
                    before its files are deleted.
    """
    spec = os.environ.get("RCN_FAULT", "")
    if not spec:
        return
    spec, _, want_rank = spec.partition("@")
    fields = spec.split(":")
    if fields[:2] == [point, str(step)] and rank == int(want_rank or 0):
        sig = getattr(signal, fields[2]) if len(fields) > 2 else signal.SIGKILL
        os.kill(os.getpid(), sig)


def fault_armed(point: str) -> bool:
    """Whether RCN_FAULT names `point` at all (so that a costly wrapper is only put in place then)."""
    return os.environ.get("RCN_FAULT", "").startswith(f"{point}:")


def pause(point: str) -> None:
    """RCN_TEST_PAUSE=<point>[,<point>...][@<rank>]: hold the process at each `point` named (on
    rank 0, or the rank named; the rank is read from RANK, which torchrun sets) until a stop signal
    arrives (at most 120 s), so that a test can send one exactly there: "start" (the entry point,
    before torch is imported), "teardown" (after the last step, before the process group's
    teardown), "exit" (the process's last call). Each pause announces itself with one line on
    stderr, `rcn-test: paused at <point> (pid <pid>)`."""
    spec = os.environ.get("RCN_TEST_PAUSE", "")
    if not spec:
        return
    points, _, rank = spec.partition("@")
    if point not in points.split(",") or (rank or "0") != os.environ.get("RANK", "0"):
        return
    print(f"rcn-test: paused at {point} (pid {os.getpid()})", file=sys.stderr, flush=True)
    signals.wait_for_signal(timeout_s=120)


def min_step_seconds() -> float:
    """RCN_TEST_MIN_STEP_S=<seconds>: every optimizer step lasts at least that long (the loop
    sleeps the rest of it), so that a test knows how many steps fit into a time limit whatever the
    machine's speed (tests/test_slurm_train.py, tests/test_submitit.py). Unset: 0, no effect. A
    value that is not a number of seconds in [0, 3600) is a ConfigError."""
    value = os.environ.get("RCN_TEST_MIN_STEP_S") or "0"
    with contextlib.suppress(ValueError):
        if 0 <= float(value) < 3600:
            return float(value)
    raise ConfigError(f"RCN_TEST_MIN_STEP_S={value!r} is not a number of seconds in [0, 3600)")


def dump_loaded_state_path() -> str | None:
    """RCN_DUMP_LOADED_STATE=<file>: where rank 0 writes what the engine holds right after a
    resume's load (tests/test_layouts.py compares it with the checkpoint's own files); None unset."""
    return os.environ.get("RCN_DUMP_LOADED_STATE") or None


def skip_memory_check() -> bool:
    """RCN_SKIP_MEMORY_CHECK=1: rcn_dist.memory.check_fits estimates but never refuses (for tests
    that exercise what comes after a refusal would have stopped them, and for a user who knows
    better than the estimate)."""
    return os.environ.get("RCN_SKIP_MEMORY_CHECK") == "1"


def ds_shm_comm() -> bool:
    """RCN_DS_SHM=1: leave DeepSpeed's CPU shared-memory all-reduce op on (it is off by default:
    rcn_dist.parallel.engine explains why); for the test that measures the crash rate with it."""
    return os.environ.get("RCN_DS_SHM") == "1"
