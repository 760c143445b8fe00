"""Training submitted from Python with submitit (rcn_dist.submit) on the real local Slurm: a
preemption that takes submitit's preempted branch and a real timeout both checkpoint, requeue,
resume and finish with the uninterrupted run's losses; `rcn submit --sweep` runs a job array and
compares the runs.

Each test uses a fresh submitit folder: job ids restart at 1 on a new cluster state, and an old
result file would be returned for a new job.
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
from slurm_util import (
    LIMIT_STEPS,
    PY,
    REPO,
    SIGNAL_AHEAD_S,
    STEP_S,
    TIME_LIMIT_MIN,
    TRAIN,
    losses,
    scancel,
    scancel_signal,
    steps_logged,
    train_env,
    wait_for_step,
    wait_job,
)

from rcn_dist.config import ConfigError
from rcn_dist.submit import main, submit, sweep_points


def on_slurm(test):
    """Mark a test as one that runs jobs on the local Slurm."""
    return pytest.mark.slow(pytest.mark.slurm(test))


@pytest.fixture
def job_env(slurm_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This process's environment as a training job should inherit it (submitit's sbatch passes
    it on): the local cluster, one thread per rank, no enclosing allocation or stray ranks."""
    env = train_env()
    for key in [k for k in os.environ if k not in env]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def requeues(err: str) -> list[str]:
    """Slurm's lines in task 0's stderr for each requeue of the job."""
    return re.findall(r"\*\*\* JOB \d+ ON \S+ CANCELLED AT \S+ DUE TO JOB REQUEUE", err)


def stops_and_resumes(log_text: str) -> tuple[list[int], list[int]]:
    """Steps of the "stop signal (SIGNAL): checkpointed at step N" and "resumed from ... (step N)" lines."""
    stops = [int(s) for s in re.findall(r"stop signal \(.*?\): checkpointed at step (\d+)", log_text)]
    resumes = [int(s) for s in re.findall(r"resumed from .* \(step (\d+)\)", log_text)]
    return stops, resumes


@on_slurm
def test_preemption_takes_submitits_preempted_branch_and_resumes_exactly(job_env, fmnist_small, reference_dir,
                                                                         tmp_path):
    """A preemption the way submitit's own Job._interrupt sends it (`scancel --signal=TERM`, then
    `--signal=USR2`) to a job with a 15-minute limit: submitit tells a preemption from a timeout
    only for a signal within min(0.8 T, T - 10 min) of run time (5 minutes here; under 10 minutes
    every signal reads as a timeout). Both ranks checkpoint at one step, task 0 hands the USR2 to
    submitit, which reads a preemption and requeues. With no timeout allowed (max_requeues=0) a
    timeout reading would end the job unrequeued instead. The job resumes and returns both tasks'
    results, with the uninterrupted run's losses."""
    steps, run_dir = 40, tmp_path / "run"
    job = submit([*TRAIN, "--data", str(fmnist_small), "--out", str(run_dir), "--steps", str(steps)],
                 folder=tmp_path / "submitit", cluster="slurm", nodes=1, tasks_per_node=2, timeout_min=15,
                 max_requeues=0)
    try:
        wait_for_step(run_dir, 3, job.job_id, env=job_env)
        scancel_signal(job.job_id, "TERM", env=job_env)
        scancel_signal(job.job_id, "USR2", env=job_env)
        state = wait_job(job.job_id, timeout=300, env=job_env)
        out, err = job.task(0).stdout() or "", job.task(0).stderr() or ""  # task 0: the one that requeues
        assert state == "COMPLETED", out[-3000:] + err[-3000:]
        assert job.results() == [{"run_dir": str(run_dir), "exit": 0}] * 2
    finally:
        scancel(job.job_id, env=job_env)
    # submitit's handler ran on the USR2 (once), read it as a preemption, and its requeue ended the
    # first attempt.
    assert len(re.findall(r"Caught signal SIGUSR2 on \S+: this job is preempted\.", err)) == 1, err[-3000:]
    assert "timed-out" not in err and len(requeues(err)) == 1, err[-3000:]
    stops, resumes = stops_and_resumes(out)
    assert len(stops) == 1 and resumes == stops and 3 <= stops[0] < steps, out[-3000:]
    assert steps_logged(run_dir) == list(range(1, steps + 1))
    ref = losses(reference_dir)
    assert losses(run_dir) == {s: ref[s] for s in range(1, steps + 1)}


@on_slurm
@pytest.mark.timeout(1200)
def test_timeout_requeues_once_and_resumes_exactly(job_env, fmnist_small, reference_dir, tmp_path, monkeypatch):
    """A real 3-minute limit (submitit's signal 30 s ahead) and steps of at least STEP_S each
    (RCN_TEST_MIN_STEP_S, which the job inherits): the first attempt is signalled, checkpoints and
    requeues itself through submitit (one timeout allowed: max_requeues=1); the second resumes
    there and finishes: exactly two attempts whatever the machine's speed (slurm_util.LIMIT_STEPS
    says why), with the losses of the uninterrupted reference run, bit for bit."""
    monkeypatch.setenv("RCN_TEST_MIN_STEP_S", str(STEP_S))
    run_dir = tmp_path / "run"
    job = submit([*TRAIN, "--data", str(fmnist_small), "--out", str(run_dir), "--steps", str(LIMIT_STEPS),
                  "train.ckpt_every=100000"],  # checkpoints only at the stop and the end
                 folder=tmp_path / "submitit", cluster="slurm", nodes=1, tasks_per_node=2,
                 timeout_min=TIME_LIMIT_MIN, signal_delay_s=SIGNAL_AHEAD_S, max_requeues=1)
    try:
        state = wait_job(job.job_id, timeout=900, env=job_env)
        out, err = job.task(0).stdout() or "", job.task(0).stderr() or ""  # task 0: the one that requeues
        assert state == "COMPLETED", out[-3000:] + err[-3000:]
        assert job.results() == [{"run_dir": str(run_dir), "exit": 0}] * 2
    finally:
        scancel(job.job_id, env=job_env)
    # One signal, one checkpointed stop, one requeue, one resume from that step.
    stops, resumes = stops_and_resumes(out)
    assert len(stops) == 1 and resumes == stops and 0 < stops[0] < LIMIT_STEPS, out[-3000:]
    assert stops[0] <= (TIME_LIMIT_MIN * 60 - SIGNAL_AHEAD_S) / STEP_S, out[-3000:]  # >= STEP_S a step
    assert err.count("Caught signal SIGUSR2") == len(requeues(err)) == 1, err[-3000:]
    assert steps_logged(run_dir) == list(range(1, LIMIT_STEPS + 1))
    ref = losses(reference_dir)
    assert losses(run_dir) == {s: ref[s] for s in range(1, LIMIT_STEPS + 1)}


@on_slurm
def test_sweep_submits_an_array_and_compares_the_runs(job_env, fmnist_small, tmp_path):
    """`rcn submit --sweep train.lr=1e-3,3e-3`: one array job, one run directory per point, and
    a comparison table of the two runs with the swept field."""
    out = tmp_path / "sweep"
    proc = subprocess.run(
        [PY, "-m", "rcn_dist.cli", "submit", "--cluster", "slurm", "--folder", str(tmp_path / "submitit"),
         "--sweep", "train.lr=1e-3,3e-3", "--", "--preset", "tiny", "--data", str(fmnist_small),
         "--out", str(out), "--steps", "3", "train.eval_every=0"],
        cwd=REPO, env=job_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job_ids = re.findall(r"submitted (\S+): ", proc.stdout)
    assert len(job_ids) == 2 and len({j.split("_")[0] for j in job_ids}) == 1, proc.stdout  # one array
    runs = [out / "train.lr=1e-3", out / "train.lr=3e-3"]
    for run, lr in zip(runs, (1e-3, 3e-3)):
        assert sorted(losses(run)) == [1, 2, 3]
        assert json.loads((run / "config.json").read_text())["train"]["lr"] == lr
    table = (out / "compare" / "report.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "sweep/train.lr=" in line]
    assert len(rows) == 2, table
    assert re.search(r"\| train\.lr \| 0\.001 \| 0\.003 \|", table), table
    assert (out / "compare" / "compare.png").is_file()


def test_sweep_points_are_the_cross_product():
    assert sweep_points(["train.lr=1e-3,3e-3", "model.T=8"]) == [
        {"train.lr": "1e-3", "model.T": "8"}, {"train.lr": "3e-3", "model.T": "8"}]
    for bad in ("train.lr", "train.lr=", "train.lr=,"):
        with pytest.raises(ConfigError, match="sweep"):
            sweep_points([bad])


@pytest.mark.parametrize("argv, message", [
    (["--preset", "tiny"], "needs --out RUN_DIR"),
    (["--preset", "tiny", "--out", "x", "train.lr=fast"], "train.lr"),
    (["--sweep", "train.steps=10,ten", "--", "--preset", "tiny", "--out", "x"], "train.steps"),
])
def test_submit_refuses_bad_arguments_before_queueing(argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=message):
        main(["--cluster", "debug", *argv])
    assert list(tmp_path.iterdir()) == []  # nothing submitted, no submitit folder
