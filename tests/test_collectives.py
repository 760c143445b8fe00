"""Every collective on a device its process group serves (rcn_dist/parallel/collectives.py).

A process group started as "nccl" has no CPU backend: a CPU tensor handed to it fails the first
step on a GPU. The package therefore reduces only through parallel.collectives, and these tests
hold it to that: a scan of the source, the device a recorded NCCL launch gets for its
collectives, and the helper's own moves."""

from __future__ import annotations

import ast
import json

import pytest
import torch
from conftest import REPO

from rcn_dist.parallel import collectives
from rcn_dist.parallel.env import detect

COLLECTIVES = {
    "all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor", "all_gather_object",
    "all_to_all", "all_to_all_single", "barrier", "monitored_barrier", "broadcast", "broadcast_object_list",
    "gather", "gather_object", "reduce", "reduce_scatter", "reduce_scatter_tensor", "scatter",
    "scatter_object_list",
}
HELPER = REPO / "rcn_dist" / "parallel" / "collectives.py"


def direct_collectives(source: str) -> list[str]:
    """`dist.X(...)`, `torch.distributed.X(...)` and `from torch.distributed import X` for a
    collective X in `source`, as "line: name"."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            found += [f"{node.lineno}: {a.name}" for a in node.names if a.name in COLLECTIVES]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            owner = ast.unparse(node.func.value)
            if owner in ("dist", "torch.distributed"):
                found.append(f"{node.lineno}: {owner}.{node.func.attr}")
    return found


def test_the_scan_finds_each_form():
    src = ("import torch.distributed as dist\nfrom torch.distributed import barrier\n"
           "dist.all_reduce(t)\ntorch.distributed.broadcast(t, 0)\ncollectives.all_reduce(t)\n")
    assert direct_collectives(src) == ["2: barrier", "3: dist.all_reduce", "4: torch.distributed.broadcast"]


def test_nothing_outside_the_helper_calls_a_collective_directly():
    files = sorted([*(REPO / "rcn_dist").rglob("*.py"), *(REPO / "launch").glob("*.py")])
    assert len(files) > 30
    bad = {str(f.relative_to(REPO)): hits for f in files if f != HELPER
           and (hits := direct_collectives(f.read_text()))}
    assert not bad, f"collectives outside rcn_dist/parallel/collectives.py: {bad}"


def _processes(name: str) -> list[dict[str, str]]:
    return json.loads((REPO / "tests" / "envs" / name).read_text())["processes"]


@pytest.mark.parametrize("name", ["torchrun.json", "deepspeed.json", "srun_gpus_per_task.json"])
def test_a_recorded_nccl_launch_reduces_on_the_ranks_gpu(name):
    for env in _processes(name):
        launch = detect(env, cuda=True)
        assert launch.backend == "nccl"
        dev = collectives.device_for_backend(launch.backend, launch.device)
        assert dev.type == "cuda" and dev == torch.device(launch.device)
        if name == "srun_gpus_per_task.json":  # one GPU visible per task: always its cuda:0
            assert dev == torch.device("cuda:0")
        else:
            assert dev.index == int(env["LOCAL_RANK"])


def test_a_gloo_launch_reduces_on_the_cpu():
    for env in _processes("torchrun.json"):
        launch = detect(env, cuda=False)
        assert collectives.device_for_backend(launch.backend, launch.device) == torch.device("cpu")


class _Reached(Exception):
    pass


def test_all_reduce_moves_a_tensor_to_the_groups_device(monkeypatch):
    """A CPU tensor reaches torch.distributed on the group's device (here a stand-in "meta" device
    for the GPU, which this machine lacks), not where it was made."""
    seen = []

    def record(t, op=None, group=None):
        seen.append((t.device.type, t.dtype, tuple(t.shape)))
        raise _Reached

    monkeypatch.setattr(collectives, "active", lambda: True)
    monkeypatch.setattr(collectives, "comm_device", lambda group=None: torch.device("meta"))
    monkeypatch.setattr(collectives.dist, "all_reduce", record)
    with pytest.raises(_Reached):
        collectives.all_reduce(torch.zeros(7, dtype=torch.float64))
    assert seen == [("meta", torch.float64, (7,))]


def test_without_a_process_group_the_helpers_are_no_ops():
    t = torch.arange(3.0)
    assert collectives.all_reduce(t) is t
    collectives.barrier()
    assert collectives.broadcast_object({"a": 1}) == {"a": 1}


def test_all_reduce_on_one_gloo_rank_returns_the_sum(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0, world_size=1)
    try:
        assert collectives.comm_device() == torch.device("cpu")
        out = collectives.all_reduce(torch.tensor([1.5, 2.0], dtype=torch.float64), op="max")
        assert out.tolist() == [1.5, 2.0]
        assert collectives.broadcast_object([3, "x"]) == [3, "x"]
    finally:
        collectives.destroy()
    assert not collectives.active()
