"""Launch-environment detection, in one place, and the one process-group start-up.

Who started us (torchrun, the deepspeed launcher, mpirun, srun, or nothing: one process) decides
where rank, world size and the rendezvous come from; docs/cluster.md has the table. mpirun is
checked before srun: under mpirun inside an allocation SLURM_PROCID is 0 for every process.
`rcn env` prints what was detected, without starting anything.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

from rcn_dist.console import Console
from rcn_dist.errors import RendezvousError


@dataclass(frozen=True)
class RankGroups:
    """The process groups a layout asked for (LayoutSpec.groups): this rank's pipeline (its
    model copy's consecutive ranks) and its data-parallel group (the ranks of its stage across
    the copies). None where not built."""

    pipeline: Any = None
    data: Any = None


@dataclass(frozen=True)
class RankLayout:
    """The rank grid of a run (torchtitan's ParallelDims, for the two dimensions rcn_dist has):
    `pipeline_stages` consecutive ranks hold one copy of the model, one stage each, and the
    copies are data-parallel replicas. Every rank-number rule of the package is here."""

    world_size: int
    rank: int
    pipeline_stages: int = 1

    @property
    def dp_size(self) -> int:
        """Data-parallel replicas: the world divided by the pipeline depth."""
        return self.world_size // self.pipeline_stages

    @property
    def dp_rank(self) -> int:
        """Data-parallel rank: the ranks of one pipeline are consecutive, so they share it."""
        return self.rank // self.pipeline_stages

    @property
    def pp_rank(self) -> int:
        """Stage within the pipeline (0: encoder stack, 1: decoder stack)."""
        return self.rank % self.pipeline_stages

    def pipeline_ranks(self, copy: int) -> list[int]:
        """The ranks of model copy `copy`, stage 0 first."""
        return list(range(copy * self.pipeline_stages, (copy + 1) * self.pipeline_stages))

    def data_ranks(self, stage: int) -> list[int]:
        """The ranks that hold stage `stage`, one per model copy."""
        return list(range(stage, self.world_size, self.pipeline_stages))

    def groups(self) -> RankGroups:
        """Build every pipeline and data-parallel group and return this rank's (a collective:
        every rank calls it, the groups are made in the same order everywhere)."""
        # Imported here: LaunchEnv's module stays free of torch until a process group starts.
        from rcn_dist.parallel import collectives

        pipeline = data = None
        for k in range(self.dp_size):
            g = collectives.new_group(self.pipeline_ranks(k))
            if k == self.dp_rank:
                pipeline = g
        for s in range(self.pipeline_stages):
            g = collectives.new_group(self.data_ranks(s))
            if s == self.pp_rank:
                data = g
        return RankGroups(pipeline=pipeline, data=data)


@dataclass
class LaunchEnv:
    """Where this process sits in the job."""

    launcher: str
    """torchrun | deepspeed | mpirun-openmpi | mpirun-mpich | srun | single"""
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    device: str
    """"cpu" or "cuda:<index>" (gpu_index: the local rank, or 0 with one visible GPU per task)."""
    backend: str
    """"gloo" on CPU, "nccl" on GPU."""
    pipeline_stages: int = 1
    """The layout's pipeline depth (LayoutSpec.pipeline_stages): see `ranks`."""

    @property
    def ranks(self) -> RankLayout:
        """This rank in the run's rank grid."""
        return RankLayout(self.world_size, self.rank, self.pipeline_stages)

    @property
    def dp_size(self) -> int:
        return self.ranks.dp_size

    @property
    def dp_rank(self) -> int:
        return self.ranks.dp_rank

    @property
    def pp_rank(self) -> int:
        return self.ranks.pp_rank


def _int(env: Mapping[str, str], *names: str, default: int | None = None) -> int | None:
    for n in names:
        if env.get(n, "") != "":
            return int(env[n])
    return default


def first_host(nodelist: str) -> str:
    """First host name of a Slurm node list: "node[3-5,7],gpu1" -> "node3", "a,b" -> "a"."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not m:
        return nodelist
    prefix, _, ranges = m.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _port_from_job(job_id: str) -> int:
    # Two jobs sharing a node must not collide; the job id keeps the port stable across requeues.
    return 20000 + int(re.sub(r"\D", "", job_id) or 0) % 20000


def tasks_on_node(spec: str, node: int) -> int | None:
    """Slurm's compressed tasks-per-node list ("2(x3),1": 2, 2, 2, 1) at index `node`; None when
    the list is missing, malformed or too short."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            return None
        counts += [int(m[1])] * int(m[2] or 1)
    return counts[node] if 0 <= node < len(counts) else None


def gpu_index(local_rank: int, env: Mapping[str, str], visible: int | None = None) -> int:
    """This process's GPU among the ones it sees.

    Slurm may bind one GPU per task (--gpus-per-task=1): then each process sees one device,
    cuda:0, whatever its local rank. `visible` is the number of GPUs this process sees; without
    it, the count in CUDA_VISIBLE_DEVICES, when set; with neither, the local rank.
    """
    if visible is None:
        ids = [i for i in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if i.strip()]
        visible = len(ids) or None
    return local_rank % visible if visible else local_rank


def detect(environ: Mapping[str, str] | None = None, cuda: bool | None = None,
           pipeline_stages: int = 1) -> LaunchEnv:
    """Detect the launcher and this process's place from the environment (no side effects)."""
    env = os.environ if environ is None else environ
    if cuda is None:
        import torch  # detect() and `rcn env` run without torch (a launcher's check in a second)

        cuda = torch.cuda.is_available()
    addr = env.get("MASTER_ADDR", "")
    port = _int(env, "MASTER_PORT")

    if env.get("RANK", "") != "" and env.get("WORLD_SIZE", "") != "":
        launcher = "deepspeed" if "CROSS_RANK" in env or "CROSS_SIZE" in env else "torchrun"
        if "TORCHELASTIC_RUN_ID" in env:
            launcher = "torchrun"
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = _int(env, "LOCAL_RANK", default=0)
        local_world = _int(env, "LOCAL_WORLD_SIZE", "LOCAL_SIZE", default=world)
    elif "OMPI_COMM_WORLD_RANK" in env:
        launcher = "mpirun-openmpi"
        rank, world = int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"])
        local_rank = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", default=0)
        local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", default=world)
    elif "PMI_RANK" in env and "PMI_SIZE" in env:
        launcher = "mpirun-mpich"
        rank, world = int(env["PMI_RANK"]), int(env["PMI_SIZE"])
        local_rank = _int(env, "MPI_LOCALRANKID", default=rank)
        local_world = _int(env, "MPI_LOCALNRANKS", default=world)
    elif "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        launcher = "srun"
        rank, world = int(env["SLURM_PROCID"]), _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", default=1)
        local_rank = _int(env, "SLURM_LOCALID", default=0)
        nodes = _int(env, "SLURM_STEP_NUM_NODES", "SLURM_NNODES", default=1)
        # Tasks on this node: uneven layouts (--ntasks=3 on 2 nodes: "2,1") differ from world // nodes.
        local_world = tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", ""),
                                    _int(env, "SLURM_NODEID", default=0)) or world // max(nodes, 1)
        if not addr:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
            addr = "127.0.0.1" if nodes == 1 or not nodelist else first_host(nodelist)
        if port is None:
            port = _port_from_job(env.get("SLURM_JOB_ID", "0"))
    else:
        launcher, rank, world, local_rank, local_world = "single", 0, 1, 0, 1

    if world > 1 and local_world == world and not addr:
        addr = "127.0.0.1"  # everyone on this machine: rendezvous on loopback
    device = f"cuda:{gpu_index(local_rank, env)}" if cuda else "cpu"
    return LaunchEnv(
        launcher=launcher, rank=rank, local_rank=local_rank, world_size=world,
        local_world_size=local_world, master_addr=addr or "", master_port=port or 0,
        device=device, backend="nccl" if cuda else "gloo", pipeline_stages=pipeline_stages,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finish_rendezvous(launch: LaunchEnv) -> LaunchEnv:
    """Fill in a missing master address/port and export RANK etc. for torch.distributed.

    A single process picks a free loopback port. mpirun gives no rendezvous: rank 0 picks its
    address and a free port and broadcasts them with mpi4py.
    """
    if launch.launcher == "single":
        launch.master_addr = launch.master_addr or "127.0.0.1"
        launch.master_port = launch.master_port or free_port()
    elif launch.launcher.startswith("mpirun") and (not launch.master_addr or not launch.master_port):
        from mpi4py import MPI  # optional: only mpirun launches need it, and it starts MPI at import

        comm = MPI.COMM_WORLD
        mine = None
        if comm.Get_rank() == 0:
            host = "127.0.0.1" if launch.local_world_size == launch.world_size else socket.gethostname()
            mine = (launch.master_addr or host, launch.master_port or free_port())
        launch.master_addr, launch.master_port = comm.bcast(mine, root=0)
    if launch.device.startswith("cuda"):
        # DeepSpeed picks its device from LOCAL_RANK, so the index is exported as LOCAL_RANK below.
        import torch

        launch.device = f"cuda:{gpu_index(launch.local_rank, os.environ, torch.cuda.device_count() or None)}"
    if not launch.master_addr or not launch.master_port:
        raise RuntimeError(f"{launch.launcher}: no MASTER_ADDR/MASTER_PORT for a {launch.world_size}-process job")
    os.environ.update(
        RANK=str(launch.rank), WORLD_SIZE=str(launch.world_size),
        LOCAL_RANK=launch.device.split(":")[1] if launch.device.startswith("cuda") else str(launch.local_rank),
        LOCAL_WORLD_SIZE=str(launch.local_world_size), MASTER_ADDR=launch.master_addr,
        MASTER_PORT=str(launch.master_port),
    )
    return launch


LAUNCHER_MARKS = ("TORCHELASTIC_RUN_ID", "CROSS_RANK", "CROSS_SIZE")
"""Variables a launcher sets beside RANK and WORLD_SIZE (torchrun; the deepspeed launcher). RANK
and WORLD_SIZE without any of them may be a user's stale shell variables."""

RENDEZVOUS_TIMEOUT_S = (30.0, 900.0)
"""How long the rendezvous waits for every rank, in seconds: RANK/WORLD_SIZE without a launcher's
marks (30: a stale shell should fail soon), any other multi-process launch (900: ranks of a large
srun or mpirun job start minutes apart on a slow shared file system). RCN_RENDEZVOUS_TIMEOUT_S
overrides both."""


def rendezvous_timeout(launch: LaunchEnv, environ: Mapping[str, str] | None = None) -> float:
    """Seconds this process's rendezvous waits for the other ranks (RENDEZVOUS_TIMEOUT_S)."""
    env = os.environ if environ is None else environ
    raw = env.get("RCN_RENDEZVOUS_TIMEOUT_S", "")
    if raw:
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if not 0 < value < 86400:
            raise RendezvousError(f"RCN_RENDEZVOUS_TIMEOUT_S={raw!r} is not a number of seconds in (0, 86400)")
        return value
    bare = launch.launcher in ("torchrun", "deepspeed") and not any(k in env for k in LAUNCHER_MARKS)
    return RENDEZVOUS_TIMEOUT_S[0] if bare else RENDEZVOUS_TIMEOUT_S[1]


def _rendezvous_store(launch: LaunchEnv, timeout_s: float):
    """The TCPStore every rank meets at (what torch's env:// would make), waited for at most
    timeout_s: rank 0 hosts it (unless torchrun's agent does) and waits for the others, the others
    connect. One line on failure instead of a wait without end. Its timeout is torch's default
    afterwards, for the process group that runs on it."""
    import torch.distributed as dist  # torch only once a process group starts (detect() is light)

    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    is_master = launch.rank == 0 and not agent_store
    if not is_master and not _reachable(launch.master_addr, launch.master_port, timeout_s):
        # Found out with a plain socket: torch's client would log a C++ stack at the same timeout.
        raise RendezvousError(_no_rendezvous(launch, timeout_s, "nothing listens there"))
    try:
        store = dist.TCPStore(launch.master_addr, launch.master_port, launch.world_size,
                              is_master=is_master, timeout=timedelta(seconds=timeout_s),
                              wait_for_workers=True, multi_tenant=True)
    except RuntimeError as e:  # torch's DistStoreError / DistNetworkError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise RendezvousError(_no_rendezvous(launch, timeout_s, first)) from None
    store.set_timeout(dist.constants.default_pg_timeout)
    return store


def _reachable(addr: str, port: int, timeout_s: float) -> bool:
    """Whether something accepts TCP connections at addr:port within timeout_s (retried)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((addr, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)


def _no_rendezvous(launch: LaunchEnv, timeout_s: float, why: str) -> str:
    return (f"rank {launch.rank} of {launch.world_size} ({launch.launcher}): the other ranks did not meet at "
            f"{launch.master_addr}:{launch.master_port} within {timeout_s:g} s ({why}); if this is not a "
            f"multi-process launch, unset RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT "
            f"(RCN_RENDEZVOUS_TIMEOUT_S sets the wait)")


def init_process_group(launch: LaunchEnv) -> LaunchEnv:
    """Start torch.distributed for this process: the rendezvous (finish_rendezvous, then a store
    every rank meets at within rendezvous_timeout), this process's GPU as the current device, then
    the process group on that store. A DeepSpeed engine then finds it started (the DeepSpeed
    layout's LayoutSpec.init_comm only wraps it). Every command starts it here."""
    finish_rendezvous(launch)
    timeout_s = rendezvous_timeout(launch)
    import torch  # here, not at the top: detect() and `rcn env` stay free of torch
    import torch.distributed as dist  # (the same)

    if launch.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(launch.device))

    store = _rendezvous_store(launch, timeout_s)
    dist.init_process_group(launch.backend, store=store, rank=launch.rank, world_size=launch.world_size)
    return launch


def main(argv: list[str] | None = None) -> int:
    """`rcn env`: print the detected launch environment and exit."""
    ap = argparse.ArgumentParser(prog="rcn env", description=main.__doc__)
    ap.add_argument("--pipeline-stages", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    args = ap.parse_args(argv)
    launch = detect(pipeline_stages=args.pipeline_stages)
    d = asdict(launch) | {"dp_rank": launch.dp_rank, "dp_size": launch.dp_size, "pp_rank": launch.pp_rank}
    if args.json:
        print(json.dumps(d, sort_keys=True))
    else:
        Console().table(f"launch environment (rank {launch.rank})", d)
    return 0
