"""Training submitted from Python with submitit (rcn_dist.submit) on the real local Slurm: a
preemption through submitit's API and a real timeout both checkpoint, requeue, resume and finish
with the uninterrupted run's losses; `rcn submit --sweep` runs a job array and compares the runs.

Each test uses a fresh submitit folder: job ids restart at 1 on a new cluster state, and an old
result file would be returned for a new job.
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
from _proc import run_group
from slurm_util import (
    PY,
    REPO,
    TRAIN,
    losses,
    scancel,
    seconds_per_step,
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
    """Steps of the "stop signal: checkpointed at step N" and "resumed from ... (step N)" lines."""
    stops = [int(s) for s in re.findall(r"stop signal: checkpointed at step (\d+)", log_text)]
    resumes = [int(s) for s in re.findall(r"resumed from .* \(step (\d+)\)", log_text)]
    return stops, resumes


@on_slurm
def test_preemption_through_submitit_requeues_and_resumes_exactly(job_env, fmnist_small, reference_dir,
                                                                   tmp_path):
    """`job._interrupt()` (scancel SIGTERM, then SIGUSR2: submitit's preemption): both ranks
    checkpoint at one step, task 0 hands over to submitit, which requeues; the job resumes and
    returns both tasks' results, with the uninterrupted run's losses."""
    steps, run_dir = 40, tmp_path / "run"
    job = submit([*TRAIN, "--data", str(fmnist_small), "--out", str(run_dir), "--steps", str(steps)],
                 folder=tmp_path / "submitit", cluster="slurm", nodes=1, tasks_per_node=2, timeout_min=10)
    try:
        wait_for_step(run_dir, 3, job.job_id, env=job_env)
        job._interrupt()
        state = wait_job(job.job_id, timeout=300, env=job_env)
        out, err = job.task(0).stdout() or "", job.task(0).stderr() or ""  # task 0: the one that requeues
        assert state == "COMPLETED", out[-3000:] + err[-3000:]
        assert job.results() == [{"run_dir": str(run_dir), "exit": 0}] * 2
    finally:
        scancel(job.job_id, env=job_env)
    # submitit's handler ran on the signal (once), and its requeue ended the first attempt.
    assert err.count("Caught signal SIGUSR2") == 1 and len(requeues(err)) == 1, err[-3000:]
    stops, resumes = stops_and_resumes(out)
    assert len(stops) == 1 and resumes == stops and stops[0] < steps, out[-3000:]
    assert steps_logged(run_dir) == list(range(1, steps + 1))
    ref = losses(reference_dir)
    assert losses(run_dir) == {s: ref[s] for s in range(1, steps + 1)}


@on_slurm
@pytest.mark.timeout(2700)  # a calibration run, then up to 20 minutes of requeued attempts
def test_timeout_requeues_and_resumes_exactly(job_env, fmnist_small, tmp_path):
    """A real 2-minute limit (signal 60 s ahead): the job is signalled, checkpoints, requeues
    itself through submitit and resumes, as often as it takes, and ends with the losses of an
    uninterrupted run of the same job (a plain `rcn train`, run meanwhile on the other core).

    One task each, so the two runs fit the 2 cores side by side. Steps: ~150 s of training at the
    speed a short single-process run measures first, more than one attempt holds (the signal
    comes 30-60 s in, after ~10 s of start-up); a slower machine takes more attempts."""
    args = [*TRAIN, "--data", str(fmnist_small)]
    calib = run_group([PY, "-m", "rcn_dist.cli", "train", *args, "--out", str(tmp_path / "calib"),
                       "--steps", "30", "train.keep_last=1000"], 600, cwd=REPO, env=job_env)
    assert calib.returncode == 0, calib.stderr[-3000:]
    # ~150 s at the measured speed: even twice as fast as measured (a calibration taken while
    # the machine was busier), the work outlasts the first signal, ~60 s into the 2-minute limit.
    steps = max(200, min(4000, int(150 / seconds_per_step(tmp_path / "calib"))))
    args += ["--steps", str(steps)]
    run_dir, straight = tmp_path / "run", tmp_path / "straight"
    job = submit([*args, "--out", str(run_dir)], folder=tmp_path / "submitit", cluster="slurm", nodes=1,
                 tasks_per_node=1, timeout_min=2, signal_delay_s=60, max_requeues=15)
    try:
        ref = run_group([PY, "-m", "rcn_dist.cli", "train", *args, "--out", str(straight)], 900, cwd=REPO,
                        env=job_env)
        assert ref.returncode == 0, ref.stderr[-3000:]
        state = wait_job(job.job_id, timeout=1200, env=job_env)
        out, err = job.task(0).stdout() or "", job.task(0).stderr() or ""  # task 0: the one that requeues
        assert state == "COMPLETED", out[-3000:] + err[-3000:]
        assert job.result() == {"run_dir": str(run_dir), "exit": 0}
    finally:
        scancel(job.job_id, env=job_env)
    # No check of submitit's "this job is timed-out" line: with a limit this short, submitit reads
    # every signal as a timeout, so the line would be there whatever sent the signal. What counts is
    # below: each SIGUSR2 led to a checkpointed stop, a requeue and a resume from that step.
    stops, resumes = stops_and_resumes(out)
    assert stops and resumes == stops and stops == sorted(set(stops)), out[-3000:]  # progress each time
    assert err.count("Caught signal SIGUSR2") == len(requeues(err)) == len(stops), err[-3000:]
    assert steps_logged(run_dir) == list(range(1, steps + 1))
    assert losses(run_dir) == losses(straight)


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
