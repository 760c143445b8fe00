"""A finished run exits 0, every time: the end of a distributed process (rcn_dist.parallel.teardown)
and short 2-rank ZeRO-3 runs repeated under torchrun and under the deepspeed launcher."""

from __future__ import annotations

import json
import socket
import textwrap
from pathlib import Path

import pytest
from conftest import PY, REPO, run

# A process that ends the way a training rank does: a gloo group that something else still holds
# (as DeepSpeed holds its groups) outlives destroy_process_group(), with work queued on it.
_RANK = textwrap.dedent("""
    import atexit, os, sys
    import torch, torch.distributed as dist
    from rcn_dist.parallel.teardown import exit_process, process_group_threads
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
    dist.init_process_group("gloo", rank=0, world_size=1)
    held = dist.new_group([0])
    for _ in range(8):
        dist.all_reduce(torch.ones(1024), group=held)
    dist.destroy_process_group()
    atexit.register(print, "atexit ran", flush=True)
    print("threads", len(process_group_threads()), "last line")  # buffered: stdout is a pipe
    exit_process(int(sys.argv[2]))
""")

_PLAIN = textwrap.dedent("""
    import atexit, sys
    from rcn_dist.parallel.teardown import exit_process, process_group_threads
    atexit.register(print, "atexit ran", flush=True)
    print("threads", len(process_group_threads()), "last line")
    exit_process(int(sys.argv[1]))
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("code", [0, 3])
def test_exit_process_keeps_the_code_and_the_output_with_group_threads_alive(code):
    p = run([PY, "-c", _RANK, str(free_port()), str(code)], timeout=120, check=False)
    assert p.returncode == code, p.stderr[-3000:]
    out = p.stdout.split()
    assert out[:2] == ["threads", out[1]] and int(out[1]) > 0, p.stdout  # the group's threads were alive
    assert p.stdout.rstrip().endswith("last line"), p.stdout  # flushed before the exit
    assert "atexit ran" not in p.stdout  # the interpreter was not finalized


def test_exit_process_is_a_plain_exit_without_group_threads():
    p = run([PY, "-c", _PLAIN, "3"], timeout=120, check=False)
    assert p.returncode == 3, p.stderr[-3000:]
    assert p.stdout.splitlines() == ["threads 0 last line", "atexit ran"]


REPEATS = 10
SHORT = ["--preset", "tiny", "train.eval_every=0", "train.ckpt_every=0", "train.batch_size=16", "--steps", "2"]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_short_zero3_runs_exit_0_every_time(fmnist_small, tmp_path):
    """2 ranks, ZeRO-3, fp32, gloo, REPEATS times under torchrun and under the deepspeed launcher:
    every launcher exits 0 (each reports a rank's non-zero exit as its own), every run finished."""
    ds = tmp_path / "ds_z3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    deepspeed = str(Path(PY).parent / "deepspeed")
    failures = []
    for i in range(REPEATS):
        for launcher in ("torchrun", "deepspeed"):
            out = tmp_path / f"{launcher}{i}"
            args = [str(REPO / "launch/train.py"), "--deepspeed", str(ds), *SHORT, "--data", str(fmnist_small),
                    "--out", str(out)]
            if launcher == "torchrun":
                cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", *args]
            else:
                cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), *args]
            p = run(cmd, timeout=300, check=False)
            finished = (out / "checkpoints" / "latest").is_file() and "done: 2 steps" in p.stdout
            if p.returncode != 0 or not finished:
                failures.append(f"{launcher} run {i}: exit {p.returncode}, finished {finished}\n"
                                f"{p.stderr[-2000:]}")
    assert not failures, f"{len(failures)} of {2 * REPEATS} runs failed:\n" + "\n".join(failures)
