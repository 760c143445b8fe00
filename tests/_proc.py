"""Child processes of the tests, each in its own process group with a deadline.

A launcher (torchrun, deepspeed, mpirun, srun) starts ranks of its own. `subprocess.run(...,
timeout=...)` kills only the launcher when the deadline passes and leaves the ranks running;
here the whole group goes, on a timeout and on anything else that ends the wait (pytest-timeout's
interrupt, Ctrl-C), so a hung multi-process test neither hangs the suite nor leaves ranks behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group that `proc` leads (started with start_new_session=True)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_group(cmd: Sequence[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw), with the child
    in a new session: at the deadline the whole group is killed and subprocess.TimeoutExpired
    raised (with the output so far)."""
    cmd = [str(c) for c in cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = _reap(proc)
        raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err) from None
    except BaseException:
        kill_group(proc)
        _reap(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _reap(proc: subprocess.Popen) -> tuple[str, str]:
    # A process that left the group (setsid) may still hold the pipes: do not wait on it forever.
    try:
        return proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return "", ""
