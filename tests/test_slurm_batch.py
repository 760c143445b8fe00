"""The per-GPU batch the Slurm scripts ask for (slurm/_common.sh `rcn_batch_overrides`): on a GPU
allocation, enough images per GPU to leave the launch-bound regime at paper size
(docs/performance.md), unless the user sets the batch; nothing on a CPU allocation."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

COMMON = Path(__file__).resolve().parents[1] / "slurm" / "_common.sh"


def overrides(**env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RCN_"))}
    return subprocess.run(["bash", "-c", f"source {COMMON} && rcn_batch_overrides"], env={**clean, **env},
                          capture_output=True, text=True)


@pytest.mark.parametrize("gpus", [{"SLURM_GPUS_ON_NODE": "4"}, {"SLURM_GPUS_PER_NODE": "h100:4"}])
def test_a_gpu_allocation_gets_1024_images_per_gpu(gpus):
    p = overrides(SLURM_NTASKS="8", **gpus)
    assert p.returncode == 0 and p.stdout.split() == ["train.micro_batch=1024", "train.batch_size=8192"]


@pytest.mark.parametrize("env", [
    {"SLURM_NTASKS": "2"},  # no GPUs: the CPU fallback keeps the preset's batch
    {"SLURM_NTASKS": "2", "SLURM_GPUS_ON_NODE": "0"},
    {"SLURM_NTASKS": "8", "SLURM_GPUS_ON_NODE": "4", "RCN_BATCH_PER_GPU": "0"},
    {"SLURM_NTASKS": "8", "SLURM_GPUS_ON_NODE": "4", "RCN_OVERRIDES": "train.lr=1e-4 train.batch_size=256"},
])
def test_the_preset_batch_stays_where_asked(env):
    p = overrides(**env)
    assert p.returncode == 0 and p.stdout.strip() == "", p.stdout


def test_per_gpu_batch_is_settable_and_checked():
    assert overrides(SLURM_NTASKS="4", SLURM_GPUS_ON_NODE="4", RCN_BATCH_PER_GPU="768").stdout.split() == [
        "train.micro_batch=768", "train.batch_size=3072"]
    bad = overrides(SLURM_NTASKS="4", SLURM_GPUS_ON_NODE="4", RCN_BATCH_PER_GPU="$(id)")
    assert bad.returncode == 2 and bad.stdout == "" and "RCN_BATCH_PER_GPU" in bad.stderr
