"""The end of a process that ran torch.distributed: exit with its code, without an abort.

A rank that had finished (its last line printed, the process group destroyed after a barrier)
could still die with SIGABRT, "terminate called without an active exception", on its way out
of the interpreter: a 2-rank ZeRO-3 run under torchrun in CI. What is known:

- DeepSpeed keeps references to its process groups (its engine and ZeRO optimizer, and
  `deepspeed.utils.groups`). `destroy_process_group()` takes them out of torch's registry but
  cannot free them: after it, every rank still runs the threads of two gloo groups
  (`gloo_tcp_loop`, `pt_gloo_runloop`). `engine.destroy()` and a garbage collection do not free
  the engine either, so those threads are alive when the interpreter finalizes and exits.
- The abort comes from the C++ runtime (std::terminate) during that exit, while those threads
  still run. The likely path (not caught in a core dump here): a thread that needs the
  interpreter after finalization began (to drop a Python-owned tensor, which takes the GIL) is
  ended by Python with pthread_exit, whose unwinding C++ code does not survive. The barrier
  before `destroy_process_group()` narrows the window but cannot close it.

So a process whose process-group threads are still alive at its end does not finalize the
interpreter: it flushes its output and leaves with `os._exit(code)`. The run has closed every
file it writes (metrics, loggers, complete checkpoints) before its teardown, so nothing is lost.

The stop signals stay caught (rcn_dist.signals) through all of this, to the process's last call:
one that arrives after the last step is recorded and changes nothing, so a finished run still
exits 0 instead of dying on it.
"""

from __future__ import annotations

import os
import sys

from rcn_dist import testhooks

# Name prefixes of the native threads torch.distributed starts for a process group.
_GROUP_THREAD_PREFIXES = ("pt_gloo", "gloo_", "pt_nccl")


def process_group_threads() -> list[str]:
    """Names of this process's live process-group threads (Linux; [] where /proc is absent)."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return []
    names = []
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:  # the thread ended meanwhile
            continue
        if name.startswith(_GROUP_THREAD_PREFIXES):
            names.append(name)
    return names


def exit_process(code: int) -> None:
    """End the process with `code`: sys.exit(code), or, while process-group threads are alive,
    flush stdout/stderr and os._exit(code), so that no such thread can meet a finalizing
    interpreter. Call it only at the very end of a program (a launcher's entry point), never from
    inside a function another program calls (submitit's job runner, tests)."""
    testhooks.pause("exit")
    if not process_group_threads():
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can go there
            pass
    _finalize_mpi()
    os._exit(code)


def _finalize_mpi() -> None:
    """MPI_Finalize where mpi4py initialised MPI (rank discovery under mpirun/srun): os._exit
    skips mpi4py's own exit hook, and mpirun reports a rank that leaves without finalizing as
    "exiting improperly" and fails the job."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
