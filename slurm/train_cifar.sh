#!/bin/bash
# CIFAR-10 (the `cifar10` preset) on Slurm: `sbatch slurm/train_cifar.sh`
# (from the checkout, or from anywhere with RCN_HOME set).
#
# Every #SBATCH value can be overridden on the command line (sbatch options beat these lines), the
# rest with RCN_* variables (slurm/_common.sh lists them). On a machine without GPUs, e.g. the
# local test cluster of slurm/local_cluster.sh, training falls back to the CPU:
#   RCN_STEPS=50 sbatch --nodes=1 --ntasks-per-node=2 --gpus-per-node=0 --cpus-per-task=1 \
#       --time=10 slurm/train_cifar.sh
# On a GPU allocation each GPU takes RCN_BATCH_PER_GPU images a step (default 1024; below ~450-900 a
# paper-size step is launch-bound, docs/performance.md), the global batch that times the tasks;
# RCN_BATCH_PER_GPU=0 keeps the preset's batch (the preset's lr was tuned at batch 128).
# The first run prepares the data: set RCN_SOURCE to cifar-10-python.tar.gz or its batch directory.
# Stop and resume: --signal sends USR2 to every rank 3 minutes before the time limit (Slurm may send
# it up to a minute earlier); the ranks checkpoint at the same step boundary and exit 3, and the
# job requeues itself. The requeued job keeps its id, so it finds its run directory and resumes.
# `scancel --signal=USR2 JOB` does the same on demand (preemption).
#SBATCH --job-name=rcn-cifar
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=USR2@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

# sbatch runs a copy of this file from its spool directory: find the checkout from the submitted
# path (scontrol's Command=), else from the submission directory.
if [[ -z ${RCN_HOME:-} && -n ${SLURM_JOB_ID:-} ]]; then
    RCN_HOME=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's|^ *Command=\(.*\)/slurm/train_[a-z0-9]*\.sh.*|\1|p')
fi
RCN_HOME=$(cd "${RCN_HOME:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}" && pwd)
# shellcheck source=slurm/_common.sh
source "$RCN_HOME/slurm/_common.sh"

RCN_DATASET=cifar10
RCN_PRESET=${RCN_PRESET:-cifar10}
RCN_DATA=${RCN_DATA:-data/cifar10}
rcn_slurm_train
