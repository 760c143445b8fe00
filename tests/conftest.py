"""Shared fixtures: a small real Fashion-MNIST shard set, and helpers to run the CLI in
subprocesses the way users do (plain python, torchrun, the deepspeed launcher)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _proc import run_group

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: one thread each (2-core machines), no stray ranks."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_", "OMPI_", "PMI_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run(cmd: list[str], timeout: float = 600, env: dict[str, str] | None = None,
        check: bool = True, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run cmd in its own process group; at `timeout` the group (a launcher and its ranks) is killed."""
    p = run_group(cmd, timeout, cwd=cwd, env=env or cli_env())
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}"
                             f"\n--- stderr\n{p.stderr[-6000:]}")
    return p


def rcn(*args: str, **kw) -> subprocess.CompletedProcess:
    return run([PY, "-m", "rcn_dist.cli", *map(str, args)], **kw)


def metrics(run_dir: Path, kind: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    if kind == "train":
        return [r for r in rows if r.get("kind") != "eval"]
    return [r for r in rows if r.get("kind") == kind]


@pytest.fixture(scope="session")
def fmnist_small(tmp_path_factory) -> Path:
    """512 training and 512 test images of the real Fashion-MNIST, in 8 + 4 shards."""
    if not FMNIST.is_dir():
        pytest.fail(f"{FMNIST} is missing: install Debian's dataset-fashion-mnist (.ci/run does)")
    out = tmp_path_factory.mktemp("data") / "fmnist"
    rcn("prepare", "--dataset", "fashion-mnist", "--out", out, "--limit", "512", "--shard-size", "64")
    return out


@pytest.fixture(scope="session")
def slurm_env() -> dict[str, str]:
    """Environment for sbatch/srun/sacct against the local cluster (started if needed)."""
    from slurm_util import start_cluster

    return start_cluster()


@pytest.fixture(scope="session")
def reference_dir(fmnist_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-rank torchrun run that the Slurm, submitit and MPI tests compare with."""
    from slurm_util import reference_run

    return reference_run(fmnist_small, tmp_path_factory.getbasetemp())
