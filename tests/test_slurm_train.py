"""The shipped sbatch scripts on the real local Slurm: two ranks, preemption and a real time limit
with requeue and exact resume (steps of a fixed minimum time, so that the number of attempts does
not depend on the machine's speed), two nodes, and a killed task followed by a resubmission.

Every job runs slurm/train_*.sh unchanged; the sbatch options and RCN_* variables a user would
set fit them onto the CPU-only local cluster.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
from _datautil import make_cifar_dir
from slurm_util import (
    CPU_JOB,
    LIMIT_STEPS,
    REPO,
    SIGNAL_AHEAD_S,
    STEP_S,
    TIME_LIMIT_MIN,
    TRAIN,
    finish_job,
    job_state,
    losses,
    sbatch,
    scancel_signal,
    steps_logged,
    task_pids,
    train_env,
    wait_for_step,
)

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

SLURM = REPO / "slurm"
# TRAIN's overrides for RCN_OVERRIDES (the scripts pass the preset and steps themselves).
OVERRIDES = " ".join(a for a in TRAIN if "=" in a)


@pytest.fixture(scope="session")
def reference(reference_dir: Path) -> dict[int, float]:
    return losses(reference_dir)


def fmnist_job(tmp_path: Path, data: Path, steps: int, *sbatch_args: str, run_dir: Path | None = None,
               overrides: str = "", **rcn: str) -> tuple[str, Path, Path]:
    """Submit slurm/train_fmnist.sh (tiny preset, TRAIN's overrides and then `overrides`); return
    (job id, run dir, log)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    run_dir, log = run_dir or tmp_path / "run", tmp_path / "job.out"
    env = train_env(RCN_PRESET="tiny", RCN_DATA=data, RCN_RUN_DIR=run_dir, RCN_STEPS=str(steps),
                    RCN_OVERRIDES=f"{OVERRIDES} {overrides}".strip(), **rcn)
    job = sbatch(SLURM / "train_fmnist.sh", *CPU_JOB, f"--output={log}", *sbatch_args, env=env)
    return job, run_dir, log


def attempts(log_text: str) -> list[dict]:
    """Per attempt of a job (as its log shows them): restart count, resumed-from step, stop step
    (0 for a stop before the first step) and the signal(s) rank 0 received."""
    out: list[dict] = []
    for line in log_text.splitlines():
        if m := re.search(r"rcn-slurm: job \d+ restart (\d+):", line):
            out.append({"restart": int(m[1]), "resumed": None, "stopped": None, "signal": None})
        elif out and (m := re.search(r"resumed from .* \(step (\d+)\)", line)):
            out[-1]["resumed"] = int(m[1])
        elif out and (m := re.search(r"stop signal \((.*?)\): checkpointed at step (\d+)", line)):
            out[-1] |= {"stopped": int(m[2]), "signal": m[1]}
        elif out and (m := re.search(r"stop signal \((.*?)\) before the first step", line)):
            out[-1] |= {"stopped": 0, "signal": m[1]}
    return out


def test_cifar_script_trains_on_two_ranks(slurm_env, tmp_path):
    """`sbatch slurm/train_cifar.sh` on a tiny CIFAR-10 in the real python-batch format: the
    batch step prepares the shards, two ranks train, checkpoint and metrics are written."""
    src = tmp_path / "cifar-10-batches-py"
    make_cifar_dir(src, per_batch=32)  # 160 training and 32 test images
    data, run_dir, log = tmp_path / "cifar", tmp_path / "run", tmp_path / "job.out"
    env = train_env(RCN_PRESET="tiny", RCN_SOURCE=src, RCN_DATA=data, RCN_PREPARE_ARGS="--shard-size 16",
                    RCN_RUN_DIR=run_dir, RCN_STEPS="4", RCN_ENV_CHECK="1",
                    RCN_OVERRIDES="model.in_channels=3 model.height=32 model.width=32 model.likelihood=logistic "
                                  "data.binarize=none train.batch_size=16 train.eval_every=0")
    job = sbatch(SLURM / "train_cifar.sh", *CPU_JOB, "--nodes=1", "--ntasks-per-node=2", f"--output={log}",
                 env=env)
    text = finish_job(job, log, env=slurm_env)
    assert "preparing data" in text and (data / "manifest.json").is_file()
    # Both ranks, as each detected itself (RCN_ENV_CHECK), and as the loop saw the world.
    ranks = sorted((e["rank"], e["world_size"], e["launcher"])
                   for e in map(json.loads, re.findall(r"^\{.*\}$", text, re.M)))
    assert ranks == [(0, 2, "srun"), (1, 2, "srun")], text
    assert "srun: 2 rank(s)" in text
    ckpt = run_dir / "checkpoints" / "step_00000004"
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000004"
    assert {p.name for p in ckpt.iterdir()} >= {"COMPLETE", "model.safetensors", "loop_rank0.json",
                                                 "loop_rank1.json"}
    assert json.loads((run_dir / "config.json").read_text())["model"]["in_channels"] == 3
    assert sorted(losses(run_dir)) == [1, 2, 3, 4]


def test_usr2_preemption_requeues_and_resumes_exactly(slurm_env, fmnist_small, reference, tmp_path):
    """`scancel --signal=USR2` mid-run: both ranks checkpoint at one step, the job requeues
    itself, resumes there and finishes with the uninterrupted run's losses, bit for bit."""
    steps = 40
    job, run_dir, log = fmnist_job(tmp_path, fmnist_small, steps, "--nodes=1", "--ntasks-per-node=2")

    def during() -> None:
        wait_for_step(run_dir, 3, job, env=slurm_env)
        scancel_signal(job, "USR2", env=slurm_env)

    text = finish_job(job, log, env=slurm_env, during=during)
    first, second = attempts(text)
    assert (first["restart"], second["restart"]) == (0, 1), text
    assert first["signal"] == "SIGUSR2" and 3 <= first["stopped"] < steps, text
    assert second["resumed"] == first["stopped"], text
    assert "requeueing job" in text and "finished:" in text
    got = losses(run_dir)
    assert steps_logged(run_dir) == list(range(1, steps + 1))  # no step lost or repeated
    assert got == {s: reference[s] for s in range(1, steps + 1)}


@pytest.mark.timeout(1200)
def test_time_limit_requeues_once_and_resumes_exactly(slurm_env, fmnist_small, reference, tmp_path):
    """A real 3-minute limit with `--signal=USR2@30` and steps of at least STEP_S each
    (RCN_TEST_MIN_STEP_S): the first attempt is signalled ahead of the limit, checkpoints and
    requeues; the second resumes there and finishes; exactly two attempts, whatever the machine's
    speed (slurm_util.LIMIT_STEPS says why). The losses of all steps are the uninterrupted
    reference run's, bit for bit. Checkpoints only at the stop and the end (train.ckpt_every
    off the cadence), so that their cost does not blur the step time."""
    job, run_dir, log = fmnist_job(tmp_path, fmnist_small, LIMIT_STEPS, "--nodes=1", "--ntasks-per-node=2",
                                   f"--time={TIME_LIMIT_MIN}", f"--signal=USR2@{SIGNAL_AHEAD_S}",
                                   overrides="train.ckpt_every=100000", RCN_MAX_RESTARTS="4",
                                   RCN_TEST_MIN_STEP_S=str(STEP_S))
    text = finish_job(job, log, timeout=900, env=slurm_env)
    first, second, *more = attempts(text)
    assert not more and (first["restart"], second["restart"]) == (0, 1), text
    assert first["signal"] == "SIGUSR2" and 0 < first["stopped"] < LIMIT_STEPS, text
    # The signal came 120-150 s after the attempt's start; at most one step a STEP_S.
    assert first["stopped"] <= (TIME_LIMIT_MIN * 60 - SIGNAL_AHEAD_S) / STEP_S, text
    assert second["resumed"] == first["stopped"] and second["stopped"] is None, text
    assert "requeueing job" in text and "finished:" in text
    assert steps_logged(run_dir) == list(range(1, LIMIT_STEPS + 1))  # no step lost or repeated
    assert losses(run_dir) == {s: reference[s] for s in range(1, LIMIT_STEPS + 1)}


def test_two_nodes_match_one_node(slurm_env, fmnist_small, reference, tmp_path):
    """2 nodes x 1 task: data parallel across node1 and node2, the same losses as 2 ranks on one
    node (the reference)."""
    job, run_dir, log = fmnist_job(tmp_path, fmnist_small, 8, "--nodes=2", "--ntasks-per-node=1")
    text = finish_job(job, log, env=slurm_env)
    assert "2 tasks on node[1-2], rendezvous node1:" in text
    assert "srun: 2 rank(s)" in text
    assert losses(run_dir) == {s: reference[s] for s in range(1, 9)}


def test_killed_task_fails_job_and_resubmission_resumes(slurm_env, fmnist_small, reference, tmp_path):
    """Node-failure stand-in: kill -9 one rank once a checkpoint is complete; the job fails; a new
    job on the same run directory resumes from the last complete checkpoint and finishes."""
    steps = 30
    job, run_dir, log = fmnist_job(tmp_path, fmnist_small, steps, "--nodes=1", "--ntasks-per-node=2")
    latest = run_dir / "checkpoints" / "latest"

    def during() -> None:
        wait_for_step(run_dir, 6, job, env=slurm_env)
        assert latest.is_file(), "no complete checkpoint at step 6 (train.ckpt_every=5)"
        pids = task_pids(job, procid=1)
        assert len(pids) == 1, pids
        os.kill(pids[0], signal.SIGKILL)

    text = finish_job(job, log, "FAILED", timeout=240, env=slurm_env, during=during)
    assert "training failed" in text
    saved = int(latest.read_text().removeprefix("step_"))
    assert 5 <= saved < steps and max(steps_logged(run_dir)) < steps

    job2, _, log2 = fmnist_job(tmp_path / "again", fmnist_small, steps, "--nodes=1", "--ntasks-per-node=2",
                               run_dir=run_dir)
    text2 = finish_job(job2, log2, env=slurm_env)
    assert attempts(text2)[0]["resumed"] == saved, text2
    logged = steps_logged(run_dir)
    resumed_at = len(logged) - (steps - saved)
    assert logged[resumed_at:] == list(range(saved + 1, steps + 1))  # continues after the checkpoint
    assert losses(run_dir) == {s: reference[s] for s in range(1, steps + 1)}
    assert job_state(job, slurm_env) == "FAILED"
