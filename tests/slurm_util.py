"""Helpers for tests against the local Slurm of slurm/local_cluster.sh (started, never mocked).

CI starts the cluster before pytest; `ensure_cluster()` starts it when it is not running (the script
is idempotent), so `pytest -m slurm` also works alone. Job states come from sacct, as submitit's do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from _proc import run_group

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO / "slurm" / "local_cluster.sh"
PY = sys.executable

# The training runs of the Slurm, submitit and MPI tests: one config, so that one uninterrupted
# reference run (`reference_losses`) serves them all. A constant LR makes the loss of step k the
# same whatever train.steps is, so a run of N steps matches the reference's first N.
TRAIN = ["--preset", "tiny", "train.eval_every=0", "train.ckpt_every=5", "train.batch_size=16",
         "train.lr_schedule=constant"]
REF_STEPS = 75
# The time-limit tests (tests/test_slurm_train.py, tests/test_submitit.py): a real 3-minute limit
# with the warning signal (USR2) 30 s ahead, and steps that last at least STEP_S each whatever the
# machine's speed (RCN_TEST_MIN_STEP_S), so that the number of attempts is known. slurmctld checks
# the limits every 30 s and sends the signal at the first check within signal+30 s of the end:
# 120-150 s after an attempt starts (seen: 132-146 s). LIMIT_STEPS steps take >= 150 s, more than
# the first attempt can hold; it trains 120-150 s minus its start-up (~10 s seen, beside two busy
# loops), so the second attempt has at most 30 s + that start-up left to do and 120 s minus its
# own start-up to do it in: exactly two attempts while the two start-ups stay under 90 s together.
TIME_LIMIT_MIN = 3
SIGNAL_AHEAD_S = 30
STEP_S = 2.0
LIMIT_STEPS = 75
# sbatch options that fit the scripts' GPU-cluster headers onto the local CPU cluster.
CPU_JOB = ["--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]

# States after which sacct's record of a job no longer changes (a requeued job passes through
# REQUEUED and PENDING, which are not final).
FINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
)
# Prefixes of variables through which an enclosing allocation (pytest itself run inside a Slurm job)
# would leak into sbatch, srun and mpirun (which would then think it runs in that allocation).
_ALLOCATION_PREFIXES = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_")

_started = False


def cluster_dir() -> Path:
    """The local cluster's work directory (configs, state, logs), as the script chooses it."""
    return Path(os.environ.get("RCN_SLURM_DIR", "/tmp/rcn-slurm"))


def cluster_env(**extra: str) -> dict[str, str]:
    """The current environment pointed at the local cluster, cleared of any enclosing allocation.

    `extra` is added last, e.g. `cluster_env(RCN_STEPS="4")` for a script's overrides.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(_ALLOCATION_PREFIXES)}
    env["SLURM_CONF"] = str(cluster_dir() / "etc" / "slurm.conf")
    env.update(extra)
    return env


def ensure_cluster(nodes: int = 2, timeout: float = 300) -> None:
    """Start the local cluster unless this process already did; fail the test when it cannot start.

    A missing cluster is a failure, not a skip: the Slurm tier must not pass by running nothing.
    """
    global _started
    if _started:
        return
    try:
        proc = subprocess.run(
            ["bash", str(CLUSTER_SCRIPT), "start", "--nodes", str(nodes)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"local Slurm did not start within {timeout:.0f} s ({CLUSTER_SCRIPT} start)", pytrace=False
        )
    if proc.returncode != 0:
        pytest.fail(
            f"local Slurm is not running and `{CLUSTER_SCRIPT} start` failed "
            f"(rc {proc.returncode}):\n{proc.stdout}{proc.stderr}",
            pytrace=False,
        )
    _started = True


def _run(cmd: Sequence[str], env: dict[str, str] | None, timeout: float = 60) -> str:
    proc = subprocess.run(
        list(cmd), env=env or cluster_env(), capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (rc {proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def sbatch(
    script_path: str | os.PathLike[str],
    *args: str,
    script_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> str:
    """Submit `script_path` with sbatch options `args`; return the job id."""
    out = _run(["sbatch", "--parsable", *args, str(script_path), *script_args], env)
    return out.strip().split(";")[0]


def job_state(job_id: str, env: dict[str, str] | None = None) -> str | None:
    """The job's state from sacct ("CANCELLED by 0" -> "CANCELLED"), None before sacct knows it."""
    out = _run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State"], env).split()
    return out[0] if out else None


def wait_job(job_id: str, timeout: float = 120, env: dict[str, str] | None = None) -> str:
    """Poll sacct until the job reaches a final state and return it; TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = job_state(job_id, env)
        if state in FINAL_STATES:
            return state
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f} s")


def finish_job(job_id: str, log: str | os.PathLike[str], expect: str = "COMPLETED", timeout: float = 300,
               env: dict[str, str] | None = None, during=None) -> str:
    """Run `during()` (if given) while the job runs, wait for its end, cancel it whatever happened,
    check its final state against `expect` and return its log text."""
    try:
        if during is not None:
            during()
        state = wait_job(job_id, timeout=timeout, env=env)
    finally:
        scancel(job_id, env=env)
    text = Path(log).read_text()
    assert state == expect, text
    return text


def scancel_signal(job_id: str, sig: str, *, batch: bool = False, env: dict[str, str] | None = None) -> None:
    """Send `sig` (e.g. "USR2") to the tasks of the job's steps, or with `batch` to its batch shell."""
    _run(["scancel", f"--signal={sig}", *(["--batch"] if batch else []), job_id], env)


def scancel(job_id: str, env: dict[str, str] | None = None) -> None:
    """Cancel the job if it still runs (test cleanup: a finished job is not an error)."""
    subprocess.run(["scancel", job_id], env=env or cluster_env(), capture_output=True, timeout=30)


def wait_for_text(path: str | os.PathLike[str], text: str, timeout: float = 60) -> str:
    """Wait until the file at `path` contains `text` (e.g. a job's "ready" line); return the file."""
    deadline = time.monotonic() + timeout
    content = ""
    while time.monotonic() < deadline:
        try:
            content = Path(path).read_text()
        except FileNotFoundError:
            content = ""
        if text in content:
            return content
        time.sleep(0.2)
    raise TimeoutError(f"{text!r} not in {path} after {timeout:.0f} s; it holds:\n{content}")


def start_cluster() -> dict[str, str]:
    """Start the local cluster if needed (see `ensure_cluster`); return `cluster_env()`.

    Each Slurm test module wraps this in its own session fixture.
    """
    ensure_cluster()
    return cluster_env()


def train_env(**extra: str | os.PathLike[str]) -> dict[str, str]:
    """`cluster_env()` for training processes: one thread each, unbuffered, no stray rank variables."""
    env = {k: v for k, v in cluster_env().items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "OMPI_", "PMI_", "PMIX_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def losses(run_dir: str | os.PathLike[str]) -> dict[int, float]:
    """{step: loss} of a run's metrics.jsonl; a step logged twice (a crash after the last
    checkpoint, then a resume) keeps its last value."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r.get("kind") != "eval"}


def steps_logged(run_dir: str | os.PathLike[str]) -> list[int]:
    """Every train step in metrics.jsonl in file order (repeats show a resume after a crash)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line being written
            continue
    return [r["step"] for r in rows if r.get("kind") != "eval"]


def wait_for_step(run_dir: str | os.PathLike[str], step: int, job_id: str | None = None,
                  timeout: float = 180, env: dict[str, str] | None = None) -> None:
    """Wait until metrics.jsonl has reached `step`; fail early when the job ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if max(steps_logged(run_dir), default=0) >= step:
            return
        if job_id and job_state(job_id, env) in FINAL_STATES:
            raise AssertionError(f"job {job_id} ended ({job_state(job_id, env)}) before step {step}")
        time.sleep(0.2)
    raise TimeoutError(f"{run_dir} did not reach step {step} within {timeout:.0f} s")


_reference: dict[str, Path] = {}


def reference_run(data: str | os.PathLike[str], workdir: Path) -> Path:
    """The run directory of an uninterrupted 2-rank torchrun run of `TRAIN` for `REF_STEPS` steps.

    Run once per test session and data set (the Slurm, submitit and MPI modules share it).
    """
    key = str(data)
    if key not in _reference:
        out = workdir / "reference"
        cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "launch" / "train.py"), *TRAIN, "--data", str(data), "--out", str(out),
               "--steps", str(REF_STEPS)]
        proc = run_group(cmd, 600, cwd=REPO, env=train_env())
        if proc.returncode != 0:
            raise AssertionError(f"reference run failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
        assert sorted(losses(out)) == list(range(1, REF_STEPS + 1))
        _reference[key] = out
    return _reference[key]


def task_pids(job_id: str, procid: int) -> list[int]:
    """PIDs of the job's training processes with SLURM_PROCID `procid` (read from /proc: the
    fake nodes are this machine)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            environ = dict(v.split("=", 1) for v in (d / "environ").read_bytes().decode(errors="replace")
                           .split("\0") if "=" in v)
            cmdline = (d / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError):
            continue
        if (environ.get("SLURM_JOB_ID") == job_id and environ.get("SLURM_PROCID") == str(procid)
                and "rcn_dist.cli\0train" in cmdline):
            pids.append(int(d.name))
    return pids
