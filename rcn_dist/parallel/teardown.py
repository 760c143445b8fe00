"""The end of a process that ran torch.distributed: exit with its code, without an abort.

Why a distributed process can die with SIGABRT ("terminate called without an active exception")
after it finished and printed its last line:

- DeepSpeed keeps references to its process groups (the engine, its ZeRO optimizer and
  `deepspeed.utils.groups` hold them; the engine is not freed even by `engine.destroy()` and a
  garbage collection). `destroy_process_group()` removes them from torch's registry but cannot
  free them, so each gloo group's worker threads (`pt_gloo_runloop`, `gloo_tcp_loop`) stay alive
  until the process ends.
- A gloo worker thread drops its reference to the last operation it ran *after* it has marked
  the operation complete. When that operation held a tensor whose Python object the program
  already let go, dropping it frees the Python object, which needs the GIL.
- On a busy machine that thread can be descheduled for seconds, past the end of `main()`. If it
  asks for the GIL after the interpreter has begun finalizing, Python ends the thread with
  `pthread_exit()`; the forced unwind runs into a `noexcept` C++ destructor, and the C++ runtime
  calls `std::terminate()`: the rank exits 134 (SIGABRT) although training finished.

A barrier before `destroy_process_group()` makes this rarer (the threads have less left to do)
but cannot exclude it, and the groups cannot be freed while DeepSpeed holds them. So a process
whose process-group threads are still alive at the end does not finalize the interpreter: it
flushes its output and leaves with `os._exit(code)`. Every file the run writes is closed (and
checkpoints are complete) before the teardown, so nothing is lost.
"""

from __future__ import annotations

import os
import sys

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
    if not process_group_threads():
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can go there
            pass
    os._exit(code)
