"""Launch-environment detection against environments recorded from the real launchers.

tests/envs/*.json hold, per launcher, the variables each process of a real 2- or 4-process launch
found set (see tests/envs/README.md for how they were recorded).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import PY, cli_env, run

from rcn_dist.parallel.env import detect, first_host, tasks_on_node
from rcn_dist.parallel.env import main as env_main

ENVS = Path(__file__).parent / "envs"

# name: (launcher, world, local world, local ranks in global-rank order, master addr, master port)
# An address of "" means "decided at rendezvous": under mpirun across nodes rank 0 sends its host
# name and a free port to the others through MPI (env.finish_rendezvous).
EXPECTED = {
    "torchrun": ("torchrun", 2, 2, [0, 1], "localhost", 43447),
    "deepspeed": ("deepspeed", 2, 2, [0, 1], "127.0.0.1", 29500),
    "mpirun_openmpi": ("mpirun-openmpi", 2, 2, [0, 1], "127.0.0.1", 0),
    "mpirun_mpich": ("mpirun-mpich", 2, 2, [0, 1], "127.0.0.1", 0),
    "srun_2nodes": ("srun", 4, 2, [0, 1, 0, 1], "node1", 20008),  # port: 20000 + job id 8
    "mpirun_in_slurm_2nodes": ("mpirun-openmpi", 4, 2, [0, 1, 0, 1], "", 0),
    "mpirun_in_slurm_1node": ("mpirun-openmpi", 2, 2, [0, 1], "127.0.0.1", 0),
    "srun_gpus_per_task": ("srun", 4, 2, [0, 1, 0, 1], "node1", 20008),
}
GPU = {"srun_gpus_per_task": [0, 0, 0, 0]}
"""The GPU index of each rank where it is not the local rank: with one visible GPU per task it is 0."""


def processes(name: str) -> list[dict[str, str]]:
    return json.loads((ENVS / f"{name}.json").read_text())["processes"]


def test_every_recording_has_an_expectation():
    assert sorted(p.stem for p in ENVS.glob("*.json")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_detect_recorded_launch(name):
    launcher, world, local_world, local_ranks, addr, port = EXPECTED[name]
    procs = processes(name)
    assert len(procs) == world
    for rank, env in enumerate(procs):
        launch = detect(env, cuda=False)
        assert (launch.launcher, launch.rank, launch.local_rank) == (launcher, rank, local_ranks[rank])
        assert (launch.world_size, launch.local_world_size) == (world, local_world)
        assert (launch.master_addr, launch.master_port) == (addr, port)
        assert (launch.device, launch.backend) == ("cpu", "gloo")
        assert (launch.dp_rank, launch.pp_rank, launch.dp_size) == (rank, 0, world)
        gpu = detect(env, cuda=True)
        assert (gpu.device, gpu.backend) == (f"cuda:{GPU.get(name, local_ranks)[rank]}", "nccl")
        # Two pipeline stages: consecutive ranks form one pipeline (encoder stage, decoder stage).
        pp = detect(env, cuda=False, pipeline_stages=2)
        assert (pp.dp_rank, pp.pp_rank, pp.dp_size) == (rank // 2, rank % 2, world // 2)


def test_mpirun_inside_slurm_reads_ompi_not_slurm_procid():
    # Open MPI starts one daemon per node with srun: SLURM_PROCID is the node, not the process.
    procs = processes("mpirun_in_slurm_1node")
    assert {p["SLURM_PROCID"] for p in procs} == {"0"} and "SLURM_STEP_ID" in procs[0]
    assert [detect(p, cuda=False).rank for p in procs] == [0, 1]
    without_step = [{k: v for k, v in p.items() if k not in ("SLURM_STEP_ID", "SLURM_STEPID")} for p in procs]
    assert [detect(p, cuda=False).rank for p in without_step] == [0, 1]


def test_no_launcher_is_a_single_process():
    launch = detect({}, cuda=False)
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_world_size) == ("single", 0, 1, 1)


@pytest.mark.parametrize("nodelist,host", [("node[1-2]", "node1"), ("gpu[07,09-12],cpu1", "gpu07"),
                                           ("a,b", "a"), ("n12", "n12")])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


@pytest.mark.slow
def test_rcn_env_json_subprocess():
    """`rcn env --json` in the environment of srun's 4th task on 2 nodes."""
    p = run([PY, "-m", "rcn_dist.cli", "env", "--json", "--pipeline-stages", "2"],
            env=cli_env(**processes("srun_2nodes")[3]))
    d = json.loads(p.stdout)
    assert d["launcher"] == "srun" and d["rank"] == 3 and d["local_rank"] == 1
    assert (d["world_size"], d["local_world_size"], d["dp_size"]) == (4, 2, 2)
    assert (d["dp_rank"], d["pp_rank"], d["pipeline_stages"]) == (1, 1, 2)
    assert (d["master_addr"], d["master_port"], d["backend"]) == ("node1", 20008, "gloo")


def test_rcn_env_table(monkeypatch, capsys):
    for k in list(os.environ):
        if k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "SLURM_", "OMPI_", "PMI_", "TORCHELASTIC")):
            monkeypatch.delenv(k)
    for k, v in processes("mpirun_mpich")[1].items():
        monkeypatch.setenv(k, v)
    assert env_main([]) == 0
    out = capsys.readouterr().out
    assert "mpirun-mpich" in out and "launch environment (rank 1)" in out


def test_srun_uneven_task_layout():
    """--ntasks=3 on 2 nodes: 2 tasks on the first node, 1 on the second (not 3 // 2 = 1 and 1)."""
    assert [tasks_on_node("2(x3),1", i) for i in range(5)] == [2, 2, 2, 1, None]
    assert tasks_on_node("", 0) is None and tasks_on_node("two", 0) is None
    base = {"SLURM_STEP_ID": "0", "SLURM_NTASKS": "3", "SLURM_NNODES": "2", "SLURM_JOB_ID": "8",
            "SLURM_STEP_TASKS_PER_NODE": "2,1", "SLURM_STEP_NODELIST": "node[1-2]"}
    layout = [(0, 0, 0), (1, 1, 0), (2, 0, 1)]  # (rank, local rank, node)
    got = [detect(base | {"SLURM_PROCID": str(r), "SLURM_LOCALID": str(lr), "SLURM_NODEID": str(n)}, cuda=False)
           for r, lr, n in layout]
    assert [(launch.rank, launch.local_rank, launch.local_world_size) for launch in got] == [(0, 0, 2), (1, 1, 2), (2, 0, 1)]
    assert {launch.world_size for launch in got} == {3} and {launch.master_addr for launch in got} == {"node1"}


def test_one_gpu_per_task_is_cuda0_and_exported_as_local_rank_0(monkeypatch):
    """Under `srun --gpus-per-task=1` the second task of a node has SLURM_LOCALID=1 but sees one
    GPU: its device is cuda:0 (cuda:1 does not exist for it), and DeepSpeed, which picks its device
    from LOCAL_RANK, must be told 0."""
    from rcn_dist.parallel.env import finish_rendezvous

    second = processes("srun_gpus_per_task")[1]
    launch = detect(second, cuda=True)
    assert (launch.local_rank, launch.device, launch.backend) == (1, "cuda:0", "nccl")
    for k, v in second.items():
        monkeypatch.setenv(k, v)
    # finish_rendezvous exports these; set them through monkeypatch first so that they are
    # removed again after the test (a leaked RANK/WORLD_SIZE makes later in-process commands
    # wait for a rendezvous that never comes).
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, second.get(k, ""))
    finish_rendezvous(launch)
    assert (launch.device, os.environ["LOCAL_RANK"], os.environ["RANK"]) == ("cuda:0", "0", "1")


def test_rendezvous_timeout_is_short_only_for_a_bare_rank_in_the_environment():
    from rcn_dist.errors import RendezvousError
    from rcn_dist.parallel.env import RENDEZVOUS_TIMEOUT_S, rendezvous_timeout

    short, long = RENDEZVOUS_TIMEOUT_S
    bare = {"RANK": "0", "WORLD_SIZE": "2"}
    assert rendezvous_timeout(detect(bare, cuda=False), bare) == short <= 30
    for marks in ({"TORCHELASTIC_RUN_ID": "x"}, {"CROSS_RANK": "0", "CROSS_SIZE": "1"}):
        env = bare | marks
        assert rendezvous_timeout(detect(env, cuda=False), env) == long
    srun = {"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7"}
    assert rendezvous_timeout(detect(srun, cuda=False), srun) == long
    assert rendezvous_timeout(detect(bare, cuda=False), bare | {"RCN_RENDEZVOUS_TIMEOUT_S": "5"}) == 5.0
    for bad in ("soon", "0", "-3"):
        with pytest.raises(RendezvousError, match="RCN_RENDEZVOUS_TIMEOUT_S"):
            rendezvous_timeout(detect(bare, cuda=False), bare | {"RCN_RENDEZVOUS_TIMEOUT_S": bad})


def test_a_stale_rank_in_the_shell_is_one_line_and_an_exit_within_60_s(tmp_path):
    """RANK/WORLD_SIZE left in a shell (no launcher, no other rank): `rcn eval` as rank 0 (it would
    host the rendezvous and wait for rank 1) and as rank 1 (it would wait for rank 0) each end
    with one error line naming the variables and exit 2, not a wait without end."""
    import subprocess
    import time

    from rcn_dist.parallel.env import free_port

    port = str(free_port())
    procs = {}
    t0 = time.monotonic()
    for rank in ("0", "1"):
        env = cli_env(RANK=rank, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port if rank == "0"
                      else str(free_port()))  # rank 1 looks for a rank 0 that is not there
        procs[rank] = subprocess.Popen([PY, "-m", "rcn_dist.cli", "eval", "--run", str(tmp_path / "run")], env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for rank, p in procs.items():
        try:
            out, err = p.communicate(timeout=90)
        finally:
            p.kill()
        assert p.returncode == 2, (rank, err[-2000:])
        lines = [ln for ln in err.strip().splitlines() if ln.startswith("rcn: error:")]
        assert len(lines) == 1 and "unset RANK, WORLD_SIZE" in lines[0] and f"rank {rank} of 2" in lines[0], err
        assert "Traceback" not in err, err[-2000:]
    assert time.monotonic() - t0 < 60


def test_the_rank_grid_owns_every_rank_number():
    """RankLayout: consecutive ranks form one model copy (pipeline), a stage's ranks across the
    copies a data-parallel group; LaunchEnv's dp/pp ranks are its."""
    from rcn_dist.parallel.env import LaunchEnv, RankLayout

    grid = RankLayout(world_size=6, rank=5, pipeline_stages=2)
    assert (grid.dp_size, grid.dp_rank, grid.pp_rank) == (3, 2, 1)
    assert [grid.pipeline_ranks(k) for k in range(3)] == [[0, 1], [2, 3], [4, 5]]
    assert [grid.data_ranks(s) for s in range(2)] == [[0, 2, 4], [1, 3, 5]]
    assert RankLayout(3, 2).data_ranks(0) == [0, 1, 2] and RankLayout(3, 2).pp_rank == 0
    launch = LaunchEnv("torchrun", 5, 1, 6, 2, "127.0.0.1", 1, "cpu", "gloo", pipeline_stages=2)
    assert launch.ranks == grid and (launch.dp_rank, launch.pp_rank, launch.dp_size) == (2, 1, 3)
