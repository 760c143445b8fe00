"""Stop signals outside the training loop (rcn_dist.signals): one that lands before torch is
imported stops the run cleanly (exit 3, nothing saved, the next run starts at step 0), and one
during the teardown of a finished run changes nothing (exit 0, the final checkpoint intact).

RCN_TEST_PAUSE holds a process at a named point until a signal arrives, so that each signal lands
exactly there, not by timing.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from _proc import kill_group
from conftest import PY, REPO, cli_env, metrics, run

from rcn_dist import signals
from rcn_dist.parallel import checkpoint as ckpt

TINY = ["--preset", "tiny", "train.eval_every=0", "train.ckpt_every=5", "train.batch_size=16"]
PAUSED = re.compile(r"rcn-test: paused at (\w+) \(pid (\d+)\)")


class Paused:
    """A command started with RCN_TEST_PAUSE, in its own process group; `signal_at(point, sig)`
    waits for its pause line at `point` and sends `sig` to the process that paused there."""

    def __init__(self, cmd: list, pause: str, **env: str) -> None:
        self.proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=cli_env(RCN_TEST_PAUSE=pause, **env),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.err: list[str] = []
        self.out = ""
        self._lines = threading.Condition()
        threading.Thread(target=self._read_err, daemon=True).start()
        threading.Thread(target=self._read_out, daemon=True).start()

    def _read_err(self) -> None:
        for line in self.proc.stderr:
            with self._lines:
                self.err.append(line)
                self._lines.notify_all()

    def _read_out(self) -> None:
        self.out = self.proc.stdout.read()

    def pid_at(self, point: str, timeout: float = 240) -> int:
        """The pid of the process paused at `point` (waits for its pause line)."""
        def paused() -> int | None:
            for line in self.err:
                if (m := PAUSED.search(line)) and m[1] == point:
                    return int(m[2])
            return None

        with self._lines:
            if not self._lines.wait_for(lambda: paused() is not None or self.proc.poll() is not None, timeout):
                raise AssertionError(f"no pause at {point} within {timeout:.0f} s:\n{self.stderr[-3000:]}")
            pid = paused()
        assert pid is not None, f"ended (rc {self.proc.poll()}) before pausing at {point}:\n{self.stderr[-3000:]}"
        return pid

    def signal_at(self, point: str, sig: int, timeout: float = 240) -> int:
        """Send `sig` to the process paused at `point`; return its pid."""
        pid = self.pid_at(point, timeout)
        os.kill(pid, sig)
        return pid

    def wait(self, timeout: float = 300) -> int:
        try:
            rc = self.proc.wait(timeout)
        finally:
            kill_group(self.proc)  # whatever is left of it (a launcher's ranks)
        self.proc.stdout.close()
        return rc

    @property
    def stderr(self) -> str:
        return "".join(self.err)


def torch_loaded(pid: int) -> bool:
    """Whether the process has torch's shared library mapped (i.e. torch is, or is being, imported)."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def test_signal_before_torch_import_stops_without_checkpoint_and_next_run_starts_at_0(fmnist_small, tmp_path):
    """SIGTERM to `rcn train` paused at its entry, before torch is loaded: exit 3, no traceback,
    one line saying so, nothing saved; the next run on the same directory trains steps 1..N.
    Before the entry caught the signals, the default action killed the process (exit -15)."""
    out = tmp_path / "run"
    args = [PY, "-m", "rcn_dist.cli", "train", *TINY, "--data", fmnist_small, "--out", out, "--steps", "3"]
    p = Paused(args, "start")
    pid = p.pid_at("start")
    loaded = torch_loaded(pid)
    os.kill(pid, signal.SIGTERM)
    rc = p.wait()
    assert not loaded  # the signal came before torch was imported
    assert rc == 3, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "stop signal (SIGTERM) before the first step: nothing to checkpoint; exit 3" in p.out, p.out
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()

    again = run(args)
    assert "resumed" not in again.stdout and "done: 3 steps" in again.stdout, again.stdout[-2000:]
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    assert (out / "checkpoints" / "latest").read_text() == "step_00000003"


def test_ctrl_c_stops_like_sigterm_and_a_second_one_aborts_keeping_the_checkpoint(fmnist_small, tmp_path):
    """SIGINT (Ctrl-C) in the middle of a run: a checkpoint at the step boundary, one line, exit 3,
    no traceback. A second SIGINT aborts at once (one line, exit 130) and leaves the last
    checkpoint as it was; the next run resumes from it and finishes."""
    out = tmp_path / "run"
    args = [PY, "-m", "rcn_dist.cli", "train", *TINY, "--data", fmnist_small, "--out", out, "--steps", "10"]
    p = run(args, env=cli_env(RCN_FAULT="step:4:SIGINT"), check=False)
    assert p.returncode == 3, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "KeyboardInterrupt" not in p.stderr, p.stderr[-3000:]
    assert "stop signal (SIGINT): checkpointed at step 5" in p.stdout, p.stdout[-2000:]
    assert (out / "checkpoints" / "latest").read_text() == "step_00000005"

    twice = Paused(args, "start")
    pid = twice.pid_at("start")
    os.kill(pid, signal.SIGINT)
    time.sleep(0.5)  # the first one ended the pause: the run goes on towards its stop
    os.kill(pid, signal.SIGINT)
    rc = twice.wait(120)
    assert rc == signals.EXIT_ABORTED == 130, twice.stderr[-3000:]
    assert "rcn: second SIGINT: aborting without a checkpoint" in twice.stderr
    found, _ = ckpt.find_latest(out)
    assert found is not None and found.name == "step_00000005"  # whole, and still the newest

    again = run(args)
    assert "resumed from" in again.stdout and "done: 10 steps" in again.stdout, again.stdout[-2000:]
    assert [r["step"] for r in metrics(out)][-5:] == [6, 7, 8, 9, 10]


@pytest.mark.slow
def test_commands_without_a_stop_protocol_keep_the_default_action():
    """`rcn env` goes through the same entry, which catches the signals first; a command that does
    not train gives them back, and one that arrived meanwhile is delivered then: the process
    ends on it as it would have without the entry's catch."""
    p = Paused([PY, "-m", "rcn_dist.cli", "env", "--json"], "start")
    p.signal_at("start", signal.SIGUSR1)
    rc = p.wait()
    assert rc == -signal.SIGUSR1, p.stderr[-3000:]


@pytest.mark.slow
def test_signals_during_teardown_and_exit_still_exit_0(fmnist_small, tmp_path):
    """A finished run signalled after its last step, before the process group's teardown (where
    the loop used to give the handlers back) and again at its very last call: exit 0, the final
    checkpoint complete, one line naming the late signal."""
    out = tmp_path / "run"
    p = Paused([PY, "-m", "rcn_dist.cli", "train", *TINY, "--data", fmnist_small, "--out", out, "--steps", "3"],
               "teardown,exit")
    p.signal_at("teardown", signal.SIGTERM)
    p.signal_at("exit", signal.SIGUSR2)
    rc = p.wait()
    assert rc == 0, p.stderr[-3000:]
    assert "done: 3 steps" in p.out and "stop signal (SIGTERM) after the last step: the run is complete; exit 0" in p.out
    assert (out / "checkpoints" / "latest").read_text() == "step_00000003"
    assert (out / "checkpoints" / "step_00000003" / "COMPLETE").is_file()
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]


def torchrun_args(*args) -> list:
    return [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
            REPO / "launch" / "train.py", *args]


@pytest.mark.slow
def test_signal_on_one_rank_before_the_first_step_stops_both(fmnist_small, tmp_path):
    """torchrun, 2 ranks: SIGUSR2 to rank 1 alone while it is held at launch/train.py's first
    lines; rank 0 never saw a signal, yet both ranks agree before the first step and exit 3
    with nothing saved (no hang, no traceback). The next run trains from step 1."""
    out = tmp_path / "run"
    args = torchrun_args(*TINY, "--data", fmnist_small, "--out", out, "--steps", "3")
    p = Paused(args, "start@1")
    p.signal_at("start", signal.SIGUSR2)
    rc = p.wait()
    # torchrun reports its ranks' exit codes in its summary and exits 1 itself.
    assert rc == 1 and "exitcode  : 3" in p.stderr, p.stderr[-3000:]
    assert not re.search(r'File ".*/rcn_dist/', p.stderr), p.stderr[-3000:]  # no rank's traceback
    assert "stop signal (on another rank) before the first step" in p.out, p.out
    assert not (out / "checkpoints").exists()
    again = run(args)
    assert "resumed" not in again.stdout
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]


@pytest.mark.slow
def test_signal_on_one_rank_during_teardown_still_exits_0(fmnist_small, tmp_path):
    """torchrun, 2 ranks: SIGTERM to rank 1 while rank 0 waits for it in the teardown's barrier:
    both ranks exit 0 (torchrun too), the final checkpoint complete."""
    out = tmp_path / "run"
    p = Paused(torchrun_args(*TINY, "--data", fmnist_small, "--out", out, "--steps", "3"), "teardown@1")
    p.signal_at("teardown", signal.SIGTERM)
    rc = p.wait()
    assert rc == 0, p.stderr[-3000:]
    assert "done: 3 steps" in p.out
    assert (out / "checkpoints" / "step_00000003" / "COMPLETE").is_file()


@pytest.mark.slow
def test_min_step_time_knob(fmnist_small, tmp_path):
    """RCN_TEST_MIN_STEP_S (test-only) makes each step last at least that long, which the Slurm
    and submitit time-limit tests count on; a bad value is one line and exit 2."""
    out = tmp_path / "run"
    args = ["train", *TINY, "--data", fmnist_small, "--out", out, "--steps", "3"]
    p = run([PY, "-m", "rcn_dist.cli", *args], env=cli_env(RCN_TEST_MIN_STEP_S="0.5"))
    assert "done: 3 steps" in p.stdout
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["img_per_s"] <= 16 / 0.5 for r in rows), rows  # 16 images a step, >= 0.5 s each
    bad = run([PY, "-m", "rcn_dist.cli", *args[:-1], "4"], env=cli_env(RCN_TEST_MIN_STEP_S="fast"), check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["rcn: error: RCN_TEST_MIN_STEP_S='fast' is not a number of seconds "
                                               "in [0, 3600)"]


def test_catch_records_and_release_gives_back():
    """In-process: catch() keeps a signal from killing the process and records it; release()
    puts back the handler that was there before; a second catch() by the same owner is a no-op."""
    before = signal.getsignal(signal.SIGUSR1)
    assert signals.catch() is True
    try:
        assert signals.catch() is False
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.received() == [signal.SIGUSR1, signal.SIGTERM]
        assert signals.previous_handler(signal.SIGUSR1) is before
    finally:
        signals.release()
    assert signal.getsignal(signal.SIGUSR1) is before
    assert signals.catch() is True  # a new owner starts a new record
    try:
        assert signals.received() == []
    finally:
        signals.release()
