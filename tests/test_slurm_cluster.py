"""The local Slurm itself: multi-task and two-node jobs, accounting, signals, MPI, submitit.

These run against the real cluster of slurm/local_cluster.sh (started here when not running, and
left running for other modules). They check the cluster the training tests build on, so a failure
here points at the cluster, not at the training code.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from slurm_util import (
    cluster_env,
    sbatch,
    scancel,
    scancel_signal,
    wait_for_text,
    wait_job,
)

pytestmark = pytest.mark.slow

# Prints one line per MPI rank, naming the MPI library mpi4py was built against. One os.write per
# line: print() under PYTHONUNBUFFERED writes the newline separately, and the launchers then
# interleave the two ranks' output mid-line.
MPI_PROGRAM = """\
import os
from mpi4py import MPI
comm = MPI.COMM_WORLD
lib = MPI.Get_library_version().split(",")[0]
os.write(1, f"rank {comm.Get_rank()} size {comm.Get_size()} lib {lib}\\n".encode())
"""


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def _mpi_ranks(output: str) -> list[tuple[int, int]]:
    """(rank, size) of every "rank R size S ..." line."""
    return sorted(
        (int(words[1]), int(words[3]))
        for words in map(str.split, output.splitlines())
        if words[:1] == ["rank"]
    )


@pytest.mark.slurm
@pytest.mark.parametrize(
    "layout, nodes",
    [(["--nodes=1", "--ntasks=2"], {"node1"}), (["--nodes=2", "--ntasks-per-node=1"], {"node1", "node2"})],
    ids=["2-tasks-1-node", "2x1-tasks-2-nodes"],
)
def test_job_runs_every_task(
    slurm_env: dict[str, str], tmp_path: Path, layout: list[str], nodes: set[str]
) -> None:
    script = _write(
        tmp_path / "tasks.sh",
        "#!/bin/bash\nsrun bash -c 'echo \"task $SLURM_PROCID of $SLURM_NTASKS on $SLURMD_NODENAME\"'\n",
    )
    out = tmp_path / "out.txt"
    job = sbatch(script, *layout, f"--output={out}", env=slurm_env)
    assert wait_job(job, timeout=60, env=slurm_env) == "COMPLETED"  # sacct's record, not squeue's
    lines = sorted(line.split() for line in out.read_text().splitlines() if line.startswith("task "))
    assert [(w[1], w[3]) for w in lines] == [("0", "2"), ("1", "2")], out.read_text()
    assert {w[5] for w in lines} == nodes


@pytest.mark.slurm
def test_usr2_reaches_batch_shell_and_tasks_separately(slurm_env: dict[str, str], tmp_path: Path) -> None:
    """`--batch` signals only the batch shell (the sbatch scripts' B:USR2 case); without it, the tasks."""
    script = _write(
        tmp_path / "signals.sh",
        """#!/bin/bash
trap 'echo "batch caught USR2"' USR2
srun --ntasks=2 bash -c 'trap "echo task $SLURM_PROCID caught USR2; exit 0" USR2
    echo "task $SLURM_PROCID ready"
    for i in $(seq 600); do sleep 0.1; done
    echo "task $SLURM_PROCID was never signalled"; exit 1' &
wait $!  # returns early when the trap runs
wait $!
""",
    )
    out = tmp_path / "out.txt"
    job = sbatch(script, "--ntasks=2", f"--output={out}", env=slurm_env)
    try:
        wait_for_text(out, "task 0 ready")
        wait_for_text(out, "task 1 ready")
        scancel_signal(job, "USR2", batch=True, env=slurm_env)
        text = wait_for_text(out, "batch caught USR2")
        assert "caught USR2" not in text.replace("batch caught USR2", "")  # the tasks did not get it
        scancel_signal(job, "USR2", env=slurm_env)
        assert wait_job(job, timeout=60, env=slurm_env) == "COMPLETED"
    finally:
        scancel(job, env=slurm_env)  # a failed check must not leave the job holding the CPUs
    text = out.read_text()
    assert "task 0 caught USR2" in text and "task 1 caught USR2" in text, text
    assert "never signalled" not in text


@pytest.mark.slurm
@pytest.mark.parametrize("nodes", [1, 2])
def test_srun_pmix_gives_distinct_mpi_ranks(slurm_env: dict[str, str], tmp_path: Path, nodes: int) -> None:
    prog = _write(tmp_path / "ranks.py", MPI_PROGRAM)
    cmd = ["srun", "--mpi=pmix", f"--nodes={nodes}", "--ntasks=2", sys.executable, str(prog)]
    proc = subprocess.run(cmd, env=slurm_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert _mpi_ranks(proc.stdout) == [(0, 2), (1, 2)], proc.stdout + proc.stderr
    assert "Open MPI" in proc.stdout  # srun --mpi=pmix needs mpi4py built against Open MPI


def test_mpirun_outside_slurm_gives_distinct_ranks(tmp_path: Path) -> None:
    prog = _write(tmp_path / "ranks.py", MPI_PROGRAM)
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    cmd = ["mpirun", "-np", "2", *root, "--oversubscribe", sys.executable, str(prog)]
    proc = subprocess.run(cmd, env=cluster_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert _mpi_ranks(proc.stdout) == [(0, 2), (1, 2)], proc.stdout + proc.stderr


@pytest.mark.slurm
def test_submitit_job_returns_its_result(
    slurm_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import submitit

    for key in [k for k in os.environ if k.startswith(("SLURM_", "SBATCH_", "SRUN_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_CONF", slurm_env["SLURM_CONF"])
    # A fresh folder: job ids restart at 1 on a new cluster, and an old result file would be returned.
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit")
    assert executor.cluster == "slurm"
    # submitit asks for USR2 90 s before the limit, and slurmctld (checking every 30 s) sends it up
    # to 30 s earlier still (slurm_util.py): with a 2-minute limit it came 20 s after the start and
    # killed a task that had already returned (the job ended FAILED). 5 minutes keep it away.
    executor.update_parameters(slurm_partition="debug", timeout_min=5, nodes=1, tasks_per_node=2)
    # A stdlib callable: the job unpickles it without importing this test module.
    job = executor.submit(os.getenv, "SLURM_PROCID")
    assert job.results() == ["0", "1"]
    # The result files exist before the job ends: ask sacct until the job's record is final.
    assert wait_job(job.job_id, timeout=60, env=slurm_env) == "COMPLETED"
