# shellcheck shell=bash
# Shared body of slurm/train_*.sh (sourced, not run). The calling script sets RCN_DATASET and its
# defaults for RCN_PRESET and RCN_DATA, then calls rcn_slurm_train.
#
# Environment overrides (sbatch options, which beat the #SBATCH lines, set nodes, tasks, GPUs, time):
#   RCN_PRESET       preset name                      RCN_CONFIG   config file laid over the preset
#   RCN_DATA         prepared shard dir               RCN_SOURCE   raw data for `rcn prepare`
#   RCN_PREPARE_ARGS more `rcn prepare` words (e.g. "--limit 2000" or "--download")
#   RCN_RUN_DIR      run directory (default $RCN_RUNS/<job name>-<job id>; RCN_RUNS default "runs")
#   RCN_STEPS, RCN_SEED, RCN_DEEPSPEED               --steps, --seed, --deepspeed of `rcn train`
#   RCN_OVERRIDES    section.field=value words (split on whitespace)
#   RCN_BATCH_PER_GPU images per GPU per step on a GPU allocation (default 1024; 0: the preset's
#                    global batch). The paper-size drawing loop issues ~16,000 kernels a step,
#                    so a GPU is launch-bound below ~450-900 images (docs/performance.md).
#   RCN_MAX_RESTARTS requeues after a stop signal before giving up (default 20)
#   RCN_MASTER_PORT  rendezvous port (default 20000 + job id % 20000)
#   RCN_SRUN_ARGS    more srun words (e.g. "--mpi=none")
#   RCN_SRUN_WAIT    seconds srun waits for the other ranks once one has exited (default 120)
#   RCN_PYTHON       interpreter (default $RCN_HOME/.venv/bin/python, else python3)
#   RCN_ENV_CHECK    1: before training, every rank prints what `rcn env --json` detects (one line each)
# Relative paths are relative to the directory sbatch was called from.

EXIT_STOPPED=3 # `rcn train` after a stop signal: checkpointed at a step boundary (or stopped before
# the first step, with nothing new to save), resumable

rcn_log() { echo "rcn-slurm: $*"; }

# The batch overrides for a GPU allocation, printed as words: train.micro_batch=P
# train.batch_size=P*tasks with P = RCN_BATCH_PER_GPU (default 1024), or nothing on a CPU
# allocation, with RCN_BATCH_PER_GPU=0, or where RCN_OVERRIDES already sets the batch.
rcn_batch_overrides() {
    local gpus=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}
    gpus=${gpus##*:} # "h100:4" -> 4
    local per_gpu=${RCN_BATCH_PER_GPU:-1024} tasks=${SLURM_NTASKS:-1}
    [[ $per_gpu =~ ^[0-9]+$ && $tasks =~ ^[0-9]+$ ]] ||
        { rcn_log "RCN_BATCH_PER_GPU and SLURM_NTASKS must be numbers, got '$per_gpu', '$tasks'" >&2; return 2; }
    [[ $gpus =~ ^[1-9][0-9]*$ ]] || return 0
    ((per_gpu > 0)) || return 0
    [[ " ${RCN_OVERRIDES:-} " =~ [[:space:]]train\.(batch_size|micro_batch)= ]] && return 0
    echo "train.micro_batch=$per_gpu train.batch_size=$((per_gpu * tasks))"
}

rcn_slurm_train() {
    local python=${RCN_PYTHON:-}
    if [[ -z $python ]]; then
        python=python3
        [[ -x $RCN_HOME/.venv/bin/python ]] && python=$RCN_HOME/.venv/bin/python
    fi
    local run_dir=${RCN_RUN_DIR:-}
    if [[ -z $run_dir ]]; then
        # Keyed by the job id, which a requeued job keeps: the restart finds its checkpoint.
        run_dir=${RCN_RUNS:-runs}/${SLURM_JOB_NAME:-rcn-$RCN_DATASET}-${SLURM_JOB_ID:-local}
    fi
    local overrides=() prepare_args=() srun_args=()
    local batch
    batch=$(rcn_batch_overrides) || return 2
    read -r -a overrides <<<"$batch ${RCN_OVERRIDES:-}"
    read -r -a prepare_args <<<"${RCN_PREPARE_ARGS:-}"
    read -r -a srun_args <<<"${RCN_SRUN_ARGS:-}"

    # Threads per rank: the CPUs Slurm gave each task (torch would otherwise take every core).
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    # Our package, importable from any submission directory.
    export PYTHONPATH=$RCN_HOME${PYTHONPATH:+:$PYTHONPATH}

    # Data once, here in the batch step (first node), never by every rank. `rcn prepare` writes
    # under a temporary name and renames, so a concurrent job never sees half a data set.
    if [[ ! -f $RCN_DATA/manifest.json ]]; then
        local prep=("$python" -m rcn_dist.cli prepare --dataset "$RCN_DATASET" --out "$RCN_DATA")
        [[ -n ${RCN_SOURCE:-} ]] && prep+=(--source "$RCN_SOURCE")
        prep+=("${prepare_args[@]}")
        rcn_log "preparing data: ${prep[*]@Q}"
        "${prep[@]}" || { rcn_log "data preparation failed"; return 1; }
    fi

    local train=("$python" -m rcn_dist.cli train --preset "$RCN_PRESET" --data "$RCN_DATA" --out "$run_dir")
    [[ -n ${RCN_CONFIG:-} ]] && train+=(--config "$RCN_CONFIG")
    [[ -n ${RCN_STEPS:-} ]] && train+=(--steps "$RCN_STEPS")
    [[ -n ${RCN_SEED:-} ]] && train+=(--seed "$RCN_SEED")
    [[ -n ${RCN_DEEPSPEED:-} ]] && train+=(--deepspeed "$RCN_DEEPSPEED")
    train+=("${overrides[@]}")

    if [[ -z ${SLURM_JOB_ID:-} ]]; then
        rcn_log "not under Slurm: one process; ${train[*]@Q}"
        "${train[@]}"
        return
    fi

    # Rendezvous on the first node of the allocation; the port follows the job id, so a
    # requeued job reuses it and two jobs sharing a node do not collide.
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    MASTER_PORT=${RCN_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    export MASTER_ADDR MASTER_PORT
    local restarts=${SLURM_RESTART_COUNT:-0} max_restarts=${RCN_MAX_RESTARTS:-20}
    # Checked before use in (( )): bash arithmetic would run a $(...) hidden in the value.
    [[ $max_restarts =~ ^[0-9]+$ ]] || { rcn_log "RCN_MAX_RESTARTS must be a number, got '$max_restarts'"; exit 2; }
    rcn_log "job $SLURM_JOB_ID restart $restarts: ${SLURM_NTASKS:-1} tasks on $SLURM_JOB_NODELIST," \
        "rendezvous $MASTER_ADDR:$MASTER_PORT, run dir $run_dir"

    # One task per GPU (or per CPU slot), as the allocation says. No --kill-on-bad-exit: a stopped
    # rank exits 3 after the collective checkpoint, and killing the slower ones would turn that 3
    # into a signal status. --wait ends the step when a crashed rank leaves the others waiting.
    if [[ ${RCN_ENV_CHECK:-0} == 1 ]]; then
        # Buffered: each rank's line leaves in one write, so the ranks' lines cannot interleave.
        env -u PYTHONUNBUFFERED srun "${srun_args[@]}" "$python" -m rcn_dist.cli env --json ||
            { rcn_log "rcn env failed"; return 1; }
    fi
    local rc=0
    srun --kill-on-bad-exit=0 --wait="${RCN_SRUN_WAIT:-120}" "${srun_args[@]}" "${train[@]}" || rc=$?
    case $rc in
    0) rcn_log "finished: $run_dir" ;;
    "$EXIT_STOPPED")
        if ((restarts >= max_restarts)); then
            rcn_log "stopped after $restarts restarts (RCN_MAX_RESTARTS=$max_restarts): not requeueing; resume by resubmitting with RCN_RUN_DIR=$run_dir"
            return "$EXIT_STOPPED"
        fi
        rcn_log "stopped at a checkpoint: requeueing job $SLURM_JOB_ID (restart $((restarts + 1)))"
        scontrol requeue "$SLURM_JOB_ID"
        ;;
    *)
        rcn_log "training failed (exit $rc); a resubmission with RCN_RUN_DIR=$run_dir resumes from its last checkpoint"
        return "$rc"
        ;;
    esac
}
