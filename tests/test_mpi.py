"""MPI launchers: `mpirun -np 2` (Debian's Open MPI) and `srun --mpi=pmix -n 2` start the same
training as torchrun. Each launcher's two processes see ranks 0 and 1 (`rcn env` under it), and
the training they run gives the torchrun reference's losses."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from _proc import run_group
from slurm_util import PY, REPO, TRAIN, losses, start_cluster, train_env

pytestmark = pytest.mark.slow

STEPS = 8
MPIRUN = ["mpirun", "-np", "2", *(["--allow-run-as-root"] if os.geteuid() == 0 else []), "--oversubscribe"]
SRUN = ["srun", "--mpi=pmix", "--nodes=1", "--ntasks=2", "--cpus-per-task=1", "--time=10"]


@pytest.fixture(scope="session")
def reference(reference_dir: Path) -> dict[int, float]:
    return losses(reference_dir)


def launched(launcher: list[str], *cmd: str, env: dict[str, str]) -> str:
    proc = run_group([*launcher, *cmd], 600, cwd=REPO, env=env)
    assert proc.returncode == 0, f"{' '.join(launcher)} exited {proc.returncode}\n{proc.stdout[-3000:]}" \
                                 f"\n{proc.stderr[-3000:]}"
    return proc.stdout


def detected_ranks(launcher: list[str], env: dict[str, str]) -> list[tuple[int, int, str]]:
    """(rank, world size, launcher) that `rcn env --json` detects in each process.

    Buffered output (no PYTHONUNBUFFERED): each process's line leaves in one write, so the two
    processes' lines cannot interleave mid-line."""
    env = {k: v for k, v in env.items() if k != "PYTHONUNBUFFERED"}
    out = launched(launcher, PY, "-m", "rcn_dist.cli", "env", "--json", env=env)
    found = [json.loads(line) for line in re.findall(r"^\{.*\}$", out, re.M)]
    return sorted((e["rank"], e["world_size"], e["launcher"]) for e in found)


@pytest.mark.parametrize("launcher", ["mpirun", pytest.param("srun-pmix", marks=pytest.mark.slurm)])
def test_mpi_launchers_train_like_torchrun(launcher, fmnist_small, reference, tmp_path):
    if launcher == "srun-pmix":
        start_cluster()
        cmd, name = SRUN, "srun"
    else:
        cmd, name = MPIRUN, "mpirun-openmpi"
    env = train_env()
    assert detected_ranks(cmd, env) == [(0, 2, name), (1, 2, name)]
    out = tmp_path / "run"
    text = launched(cmd, PY, str(REPO / "launch" / "train.py"), *TRAIN, "--data", str(fmnist_small),
                    "--out", str(out), "--steps", str(STEPS), env=env)
    assert f"{name}: 2 rank(s)" in text
    assert losses(out) == {s: reference[s] for s in range(1, STEPS + 1)}
