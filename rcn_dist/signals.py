"""Stop signals (SIGTERM, SIGUSR1, SIGUSR2, SIGINT), caught from a training process's first line to its end.

Slurm (a time limit's `--signal`, a preemption, `scancel --signal`), torchrun and users stop a run
with these signals. Their default action kills the process, so a signal that lands before the
training loop could install a handler (while torch and DeepSpeed are imported, which takes seconds)
or after the loop gave its handler back (during the teardown) killed a rank: the job failed, a
finished run's last attempt with it. So the entry points (rcn_dist.cli.entry for `rcn` and
`python -m rcn_dist`, launch/train.py, rcn_dist.submit.TrainJob) call `catch()` first, before any
heavy import; the signals are only recorded, and the training loop (StopFlag, below) reads
the record: a stop at the first step boundary, or before the first step. The handlers stay in
place to the end of the process, teardown included.

SIGINT (Ctrl-C in a terminal, which sends it to every process of the foreground group: the
launcher and each rank) is a stop like SIGTERM: checkpoint at the step boundary, one line, exit 3.
A second SIGINT aborts at once (one line, exit EXIT_ABORTED = 130, the shell's code for SIGINT,
no cleanup), for a user who will not wait for the checkpoint; what was saved before stays whole
(the commit protocol of rcn_dist.parallel.checkpoint).

This module imports nothing heavy: it runs before torch is imported.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)
EXIT_STOPPED = 3
"""Exit code of a run stopped by one of STOP_SIGNALS: resumable (run again on the same RUN_DIR)."""
EXIT_ABORTED = 128 + signal.SIGINT
"""Exit code of a run aborted by a second SIGINT: resumable from its last checkpoint."""

_received: list[int] = []
# The handlers in place before catch() replaced them: SIG_DFL, or submitit's (its job runner installs
# them before it calls the job), which StopFlag.hand_over calls once the checkpoint is written.
_before: dict[int, Any] = {}


class Stopped(Exception):
    """A stop signal ended the run before its first step: there was nothing to checkpoint. The
    entry point (rcn_dist.cli.run_main) turns it into exit EXIT_STOPPED without a traceback."""

    exit_code = EXIT_STOPPED


def _record(signum: int, frame: Any) -> None:
    if signum == signal.SIGINT and signal.SIGINT in _received:  # a second Ctrl-C: abort now
        os.write(2, b"rcn: second SIGINT: aborting without a checkpoint (the last saved one is intact)\n")
        os._exit(EXIT_ABORTED)
    _received.append(signum)


def catch() -> bool:
    """Record STOP_SIGNALS from now on instead of dying on them. Returns True where this call
    installed the handlers (it then owns them: `release()` gives them back), False where they were
    already in place (an entry point caught them earlier: the record so far is kept)."""
    if signal.getsignal(signal.SIGTERM) is _record:
        return False
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("stop signals can only be caught from the main thread")
    _received.clear()  # a new owner: what an earlier in-process run recorded is not this run's
    for s in STOP_SIGNALS:
        _before[s] = signal.signal(s, _record)
    return True


def release() -> None:
    """Put back the handlers that catch() replaced (for callers that run on after the run: a
    submitit job runner, tests). An entry point that exits after the run never calls it."""
    for s, handler in _before.items():
        signal.signal(s, handler if handler is not None else signal.SIG_DFL)
    _before.clear()


def release_and_deliver() -> None:
    """For commands that have no stop protocol (`rcn eval`, `rcn prepare`, ...): give the signals
    their usual meaning again; one that arrived meanwhile is delivered now, as if never caught."""
    if not _before:  # not caught (an in-process call): nothing to give back
        return
    pending = list(dict.fromkeys(_received))
    release()
    _received.clear()
    for s in pending:
        os.kill(os.getpid(), s)


def received() -> list[int]:
    """The stop signals recorded so far, in order of arrival."""
    return list(_received)


def previous_handler(signum: int) -> Any:
    """The handler that catch() replaced for `signum` (None where the signals are not caught)."""
    return _before.get(signum)


def names(signums: list[int]) -> str:
    """"SIGTERM, SIGUSR2" for a list of signal numbers (each once, in order)."""
    return ", ".join(signal.Signals(s).name for s in dict.fromkeys(signums))


def wait_for_signal(timeout_s: float) -> bool:
    """Sleep until a stop signal is recorded (one more than when called) or `timeout_s` passes;
    True when one came (rcn_dist.testhooks.pause holds a process this way)."""
    count = len(_received)
    deadline = time.monotonic() + timeout_s
    while len(_received) == count and time.monotonic() < deadline:
        time.sleep(0.02)
    return len(_received) > count


class StopFlag:
    """SIGTERM / SIGUSR1 / SIGUSR2 / SIGINT stop the run: the loop acts on them at the next step
    boundary (or, for one that came before the first step, before it: rcn_dist.loop.setup_run,
    where the ranks agree through rcn_dist.parallel.collectives.any_rank).

    The signals are caught by rcn_dist.signals, from the entry point's first line (so that one
    that lands while torch is imported is kept, not fatal) to the end of the process (so that one
    during the teardown changes nothing); this flag reads what it recorded. `install()` catches
    them itself where no entry point did (an in-process call), and `restore()` then gives them
    back.

    Under submitit, its own SIGUSR2 handler (installed before ours) would requeue at once from
    task 0 alone. We hold it back: every rank first checkpoints at the step boundary, then
    `hand_over()` calls it, and it requeues the job (task 0) or returns (the other tasks).
    """

    HAND_OVER_WAIT_S = 10.0
    """How long hand_over() waits for submitit's SIGUSR2 after a SIGTERM (see there)."""

    def __init__(self) -> None:
        self._owner = False

    def install(self) -> StopFlag:
        self._owner = catch()
        return self

    @property
    def received(self) -> set[int]:
        """The stop signals this process received so far."""
        return set(received())

    @property
    def signum(self) -> int:
        """The first stop signal received, 0 before any."""
        got = received()
        return got[0] if got else 0

    def restore(self) -> None:
        """Give the signals back where install() caught them (an in-process run); an entry point
        keeps them caught to the process's end."""
        if self._owner:
            release()
            self._owner = False

    def hand_over(self) -> None:
        """After the checkpoint: pass the signal on to submitit's handler, if it installed one.

        SIGUSR2 wins over SIGTERM: submitit's preemption sends both, SIGTERM first
        (Job._interrupt: `scancel --signal SIGTERM`, then `--signal USR2`), and only its SIGUSR2
        handler requeues (its SIGTERM handler just logs). A stop that came from a SIGTERM alone
        therefore waits up to HAND_OVER_WAIT_S for the SIGUSR2 that may follow, which a fast
        checkpoint could otherwise outrun.
        """
        if not _is_submitit(previous_handler(signal.SIGUSR2)):
            return
        deadline = time.monotonic() + self.HAND_OVER_WAIT_S
        while signal.SIGUSR2 not in self.received and signal.SIGTERM in self.received \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        signum = signal.SIGUSR2 if signal.SIGUSR2 in self.received else self.signum
        prev = previous_handler(signum)
        if _is_submitit(prev):
            prev(signum, None)


def _is_submitit(handler: Any) -> bool:
    return callable(handler) and getattr(handler, "__module__", "").startswith("submitit")
