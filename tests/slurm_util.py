"""Helpers for tests against the local Slurm of slurm/local_cluster.sh (started, never mocked).

CI starts the cluster before pytest; `ensure_cluster()` starts it when it is not running (the script
is idempotent), so `pytest -m slurm` also works alone. Job states come from sacct, as submitit's do.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO / "slurm" / "local_cluster.sh"

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
